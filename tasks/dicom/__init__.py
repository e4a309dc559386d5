"""DICOM input: where files come from, what their headers say, which are chest radiographs,
and how their pixels become model input.

One self-contained concern (like pydicom's ``pixels`` package): it knows nothing of the
database, Prefect or the rest of ``tasks``; of the model it uses only ``model.spec`` (the
preprocessing spec) and, for synthetic test data, ``model.synthetic``.

- ``sources``: the seam. A ``Source`` lists ``InputFile``\\ s, streamed, never raising for one
  bad file; ``discovery`` implements it for folders, files and archives (``LocalFiles``,
  ``SourceFile``), ``pacs`` for DICOMweb and DIMSE.
- ``headers`` reads an input file's header without pixels; ``selection`` decides;
- ``pixels`` turns a chosen file into model input and a review thumbnail (``thumbnails``),
  decoding through ``decoders``, a registry of backends;
- ``fingerprint``: what an image *is* (decoded values and their meaning), so that a lossless
  copy of an instance in another encoding is recognised as the same image; ``luts`` reads a
  Modality or VOI LUT item for the pixel path and the fingerprint alike;
- ``values``: the rules several steps share (safe strings for both databases, what a reason may
  quote, code strings, UID grammar, the shape of a radiograph);
- ``tags`` names attributes in every message (``(0028,0101) 'Bits Stored'``); ``outcomes``
  holds the three outcomes and the errors that carry a file's reason; ``synth`` writes
  synthetic radiographs and broken files for tests and the demo.
"""
