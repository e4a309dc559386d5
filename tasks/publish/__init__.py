"""Results back to the PACS: study results as DICOM Structured Reports (``sr``), sent by
STOW-RS or C-STORE (``destinations``), each attempt recorded in ``publications``
(``publish``)."""
