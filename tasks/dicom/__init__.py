"""DICOM input: where files come from, what their headers say, which are chest radiographs,
and how their pixels become model input.

One self-contained concern (like pydicom's ``pixels`` package): it knows nothing of the model,
the database or Prefect. Sources (folders, archives; next, the PACS) yield ``SourceFile``s;
``headers`` reads them without pixels; ``selection`` decides; ``pixels`` and ``decoders``
turn the chosen ones into model input and review thumbnails.
"""
