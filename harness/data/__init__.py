"""Data at real size: reading image files (``decode``), the decoded-image cache that every process
maps (``cache``), and where a domain's images live during a run (``placement``)."""
