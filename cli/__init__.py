"""The ``cxr-screen`` command line and everything that talks to a terminal.

Sits on top: it may import ``flows``, ``tasks``, ``model`` and ``sql``; nothing imports it.
"""
