"""Fusion methods, one module per method, named as the method is known in the literature.

Every module in this package is imported here (discovered, not listed), so a new method registers itself the
moment its file is added; `carebench.models` imports this package.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
