"""Regenerate pnc/model_names.json from the installed torchvision and timm.

Run after upgrading either library:  python bench/make_model_names.py
"""
from __future__ import annotations

from pnc.models import installed_model_names, write_model_names


def main() -> None:
    path = write_model_names()
    names = installed_model_names()
    print(f"wrote {path}: {len(names['torchvision'])} torchvision and {len(names['timm'])} timm names "
          f"(torchvision {names['versions']['torchvision']}, timm {names['versions']['timm']})")


if __name__ == "__main__":
    main()
