"""The PACS as a source and a destination: query/retrieve over DICOMweb and DIMSE, and
named PACS entries.

- ``config``: named PACS entries (address, our AE title, credentials, TLS) from a file and the
  environment; secrets never leave it in clear.
- ``dicomweb``: QIDO-RS (through dicomweb-client) and WADO-RS.
- ``dimse``: C-ECHO, C-FIND, C-MOVE to a short-lived C-STORE SCP of ours, or C-GET (pynetdicom).
- ``source``: a query/retrieve run as a source of ``SourceFile``s, with completeness by count.
- ``common``: errors, the study-date window, matches, instance URIs, the completeness ledger.

Like the rest of ``tasks.dicom``, nothing here knows the database or Prefect, and nothing reads
the environment: the CLI and the flows pass the environment (or a ``PacsConfig``) in.
"""
