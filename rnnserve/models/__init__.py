"""Model families behind one interface (``base.RecurrentLM``), found by ``registry`` and built by
``loader``. Families are imported lazily by the registry, so importing this package is cheap."""
