"""Export of a distilled set to other tools' formats: the MTT / DATM trio (``images_best.pt``, ``labels_best.pt``,
``lr_best.pt``; also what DD-Ranking's evaluators load), a torchvision ImageFolder of PNGs with the soft labels,
and a Hugging Face ``datasets`` folder (:mod:`.formats`). CLI: ``python -m contra_ray.export ARTIFACT --format
mtt|imagefolder|hf --out DIR``.
"""

from contra_ray.export.formats import (
    FORMATS,
    check_exportable,
    class_dirs,
    export_set,
    imagefolder_order,
    write_hf,
    write_imagefolder,
    write_mtt,
)

__all__ = ["main", "FORMATS", "check_exportable", "class_dirs", "export_set", "imagefolder_order", "write_hf",
           "write_imagefolder", "write_mtt"]


def __getattr__(name: str):
    if name == "main":  # the CLI, imported only when asked for: importing the stage does not load it
        from contra_ray.export.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
