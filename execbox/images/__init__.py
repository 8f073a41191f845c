"""Images: the sandbox image (``sandbox``: a Debian rootfs plus the agent, cached by
recipe hash), package images built from specs (``spec`` parses and renders a spec,
``build`` builds, lists, removes and prunes them on an engine), and the resolution of
a request's ``image`` name. Every engine operation goes through ``execbox.engine``."""

from .build import (
    SpecImage,
    build_spec,
    ensure_buildtools,
    host_ca_bundle,
    list_spec_images,
    plan_spec,
    prune_specs,
    remove_spec,
    resolve_image_name,
)
from .progress import BuildProgress, Progress, step
from .sandbox import IMAGE_LABEL, SANDBOX_DIR, RootfsRecipe, build_images, default_image, sandbox_files
from .spec import FileEntry, ImageSpec

__all__ = [
    "IMAGE_LABEL",
    "BuildProgress",
    "SANDBOX_DIR",
    "FileEntry",
    "ImageSpec",
    "Progress",
    "RootfsRecipe",
    "SpecImage",
    "build_images",
    "build_spec",
    "default_image",
    "ensure_buildtools",
    "host_ca_bundle",
    "list_spec_images",
    "plan_spec",
    "prune_specs",
    "remove_spec",
    "resolve_image_name",
    "sandbox_files",
    "step",
]
