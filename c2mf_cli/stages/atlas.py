"""The concept atlas: for each concept, the image regions of a store that activate it most.

Codes U = encode(A) are computed for every position of every image of a full-mode store (per class, with
that class's gates / dictionary); for each concept the `top` strongest positions are kept (by default at most
one per image, so the atlas shows `top` different images), and a window around each grid cell, mapped back
through the preprocessing geometry, is cut from the ORIGINAL image (`store.paths`). A person names a concept
by looking at these crops.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._io import write_json
from ..artifacts.dictionary import ConceptDictionary
from ..errors import C2MFError, UsageError
from ..methods import encode, needs_class
from ..inputs.images import read_image
from ..render.figures import (
    atlas_concept_figure,
    atlas_overview_figure,
    save_figure,
    save_png,
)
from ..render.geometry import geometry_for

CROPS_DIR = "crops"  # each region's crop, inside the atlas folder (what explain --atlas shows)


@dataclass(frozen=True)
class AtlasConfig:
    """Settings of an atlas.

    Attributes:
        top: regions per concept.
        class_name: only this class of the store (None: every class).
        window: crop side in grid cells around the strongest cell (2 cells = the cell and half a cell around).
        one_per_image: keep at most one region per image and concept (the strongest), so `top` images show.
        encode_iters: NNLS iterations of the codes.
    """

    top: int = 8
    class_name: str | None = None
    window: float = 2.0
    one_per_image: bool = True
    encode_iters: int = 100

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UsageError(f"--top must be at least 1, got {self.top}")
        if self.window <= 0:
            raise UsageError(f"--window must be positive, got {self.window}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Region:
    """One strong position of a concept: its code value, class, image row and grid cell."""

    concept: int
    value: float
    class_index: int
    image: int
    cell: tuple[int, int]


def top_positions(codes: np.ndarray, top: int, one_per_image: bool = True) -> list[list[tuple[float, int, int]]]:
    """The strongest positions of each concept in codes (n_images, P, k).

    Returns, per concept, up to `top` (value, image, position) sorted by decreasing value (ties: lower image,
    then lower position first). With `one_per_image`, each image contributes only its strongest position.
    """
    n, P, k = codes.shape
    out: list[list[tuple[float, int, int]]] = []
    for j in range(k):
        c = codes[:, :, j]
        if one_per_image:
            pos = np.argmax(c, axis=1)  # first maximum per image
            vals = c[np.arange(n), pos]
            order = np.lexsort((np.arange(n), -vals))[:top]
            out.append([(float(vals[i]), int(i), int(pos[i])) for i in order])
        else:
            flat = c.reshape(-1)
            order = np.lexsort((np.arange(flat.shape[0]), -flat))[:top]
            out.append([(float(flat[f]), int(f // P), int(f % P)) for f in order])
    return out


def _merge(best: list[list[Region]], new: list[list[Region]], top: int) -> list[list[Region]]:
    merged = []
    for a, b in zip(best, new):
        both = sorted(a + b, key=lambda r: (-r.value, r.class_index, r.image, r.cell))
        merged.append(both[:top])
    return merged


def find_regions(
    store: Any,
    dictionary: ConceptDictionary,
    config: AtlasConfig = AtlasConfig(),
    *,
    progress: Callable[[int], None] | None = None,
) -> list[list[Region]]:
    """For each concept, the `config.top` strongest regions of the store (classes with the same name in the
    store and the dictionary use that class's codes)."""
    if store.mode != "full":
        raise C2MFError("the atlas needs a store of whole images (extract --mode full): crop stores have no grid")
    if store.layout not in ("nchw", "tokens"):
        raise C2MFError(f"the store's layer has layout {store.layout!r}, without a spatial grid: no atlas")
    # the same rule as evaluate: weights, layer and width (the dictionary records the store's provenance)
    describe = getattr(store, "describe_source", None)
    store_info = describe() if describe is not None else {**store.info, "store": str(getattr(store, "path", ""))}
    try:
        dictionary.check_compatible(store_info)
        if dictionary.n_features != store.row_shape[-1]:
            raise C2MFError("channels differ")
    except C2MFError:
        from ..artifacts.dictionary import mismatch_message

        label = Path(str(dictionary.meta.get("path", ""))).stem or dictionary.method
        raise C2MFError(mismatch_message(dictionary, label, store_info, int(store.row_shape[-1]), plural=False)
                        ) from None
    classes = list(range(len(store.classes)))
    if config.class_name is not None:
        if config.class_name not in store.classes:
            raise UsageError(f"--class {config.class_name!r} is not in the store; it has: {', '.join(store.classes)}")
        classes = [store.classes.index(config.class_name)]
    needs_y = needs_class(dictionary)
    k = dictionary.n_concepts
    best: list[list[Region]] = [[] for _ in range(k)]
    gh, gw = store.grid
    for y in classes:
        name = store.classes[y]
        if name in dictionary.classes:
            dy: int | None = dictionary.class_index(name)
        elif needs_y:
            raise C2MFError(f"store class {name!r} is not in the dictionary, whose codes are per class: "
                            "use --class with one of its classes, or a store of the same classes")
        else:
            dy = None
        a = store.activations(y)
        n = a.shape[0]
        if n == 0:
            continue
        if store.layout == "tokens":
            a = a[:, store.num_prefix_tokens:]
        rows = a.reshape(n * gh * gw, -1)
        U = np.asarray(encode(dictionary, rows, dy, iters=config.encode_iters)).reshape(n, gh * gw, k)
        found = top_positions(U, config.top, config.one_per_image)
        new = [[Region(j, v, y, i, (p // gw, p % gw)) for v, i, p in found[j]] for j in range(k)]
        best = _merge(best, new, config.top)
        if progress:
            progress(1)
    return best


def _resolve_path(p: str, store: Any) -> Path:
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    root = (store.info.get("config", {}).get("data", {}) or {}).get("root")
    return Path(root) / path if root else path


def build_atlas(
    store: Any,
    dictionary: ConceptDictionary,
    out_dir: str | os.PathLike[str],
    config: AtlasConfig = AtlasConfig(),
    *,
    names: dict[int, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write out_dir/concept_NNN.png (one grid per concept), out_dir/overview.png and out_dir/atlas.json.

    Returns the atlas record (also in atlas.json): per concept its regions with value, class, image path,
    grid cell and crop box (left, top, right, bottom) in the original image. Images that cannot be read are
    listed under "missing" and skipped.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output folder {str(out)!r} is a file: give a folder path")
    regions = find_regions(store, dictionary, config, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / CROPS_DIR).mkdir(exist_ok=True)
    preprocess = store.preprocess
    paths_cache: dict[int, list[str]] = {}
    images: dict[str, Any] = {}
    missing: dict[str, str] = {}
    concepts = []
    rows_overview = []
    for j, regs in enumerate(regions):
        crops, values, captions, entries = [], [], [], []
        for r in regs:
            paths = paths_cache.setdefault(r.class_index, store.paths(r.class_index))
            path = _resolve_path(paths[r.image], store)
            key = str(path)
            if key in missing:
                continue
            if key not in images:
                try:
                    images[key] = read_image(path)
                except C2MFError as e:
                    missing[key] = str(e)
                    continue
            im = images[key]
            geo = geometry_for(preprocess, (im.height, im.width))
            box = geo.cell_box(r.cell, store.grid, window=config.window)
            crop = im.crop(box)
            crops.append(np.asarray(crop))
            values.append(r.value)
            captions.append(f"{store.classes[r.class_index]}\n{path.name}")
            # the crop itself, inside the atlas folder: explain --atlas reads these, never a path the record names
            crop_name = f"{CROPS_DIR}/c{j:03d}_{len(entries):02d}.png"
            save_png(crop, out / crop_name)
            entries.append({"value": r.value, "class": store.classes[r.class_index], "image": str(path),
                            "cell": list(r.cell), "box": list(box), "crop": crop_name})
        png = f"concept_{j:03d}.png"
        name = (names or {}).get(j)
        save_figure(atlas_concept_figure(j, crops, values, captions, name=name), out / png)
        concepts.append({"concept": j, "png": png, "name": name, "regions": entries})
        rows_overview.append((j, crops))
    save_figure(atlas_overview_figure(rows_overview, names, per_row=min(config.top, 8)), out / "overview.png")
    record = {
        "store": str(getattr(store, "path", "")),
        "dictionary": {"method": dictionary.method, "concepts": dictionary.n_concepts,
                       "tensors_sha256": dictionary.meta.get("tensors_sha256")},
        "config": config.to_dict(),
        "grid": list(store.grid),
        "overview": "overview.png",
        "concepts": concepts,
        "missing": [{"image": k, "error": v} for k, v in missing.items()],
    }
    write_json(out / "atlas.json", record)
    return record


def check_clip(checkpoint: str | os.PathLike[str]) -> Any:
    """open_clip, once the checkpoint file and the package are known to be there (call it before any atlas is
    written: a naming step that fails after the atlas would leave a finished-looking folder and exit 1)."""
    if not Path(checkpoint).is_file():
        raise C2MFError(f"CLIP checkpoint {str(checkpoint)!r} does not exist: give a local weights file")
    try:
        import open_clip  # type: ignore[import-not-found]
    except ImportError:
        raise C2MFError("naming concepts with CLIP needs open_clip (pip install open_clip_torch) and local "
                        "CLIP weights; run the atlas without --clip-checkpoint otherwise") from None
    return open_clip


def clip_names(
    atlas_record: dict[str, Any],
    vocabulary: Sequence[str],
    *,
    model_name: str,
    checkpoint: str,
) -> dict[int, str]:
    """Name each concept with the CLIP text (from `vocabulary`) closest to the mean image embedding of its
    crops (paper App. E). Needs open_clip and a LOCAL checkpoint; never downloads anything."""
    open_clip = check_clip(checkpoint)
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of {v}" for v in vocabulary]))
        text = text / text.norm(dim=-1, keepdim=True)
        names = {}
        for c in atlas_record["concepts"]:
            ims = []
            for r in c["regions"]:
                im = read_image(r["image"]).crop(tuple(r["box"]))
                ims.append(preprocess(im))
            if not ims:
                continue
            emb = model.encode_image(torch.stack(ims))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            names[int(c["concept"])] = vocabulary[int((emb.mean(0) @ text.T).argmax())]
    return names
