"""The conv head on disk: ``conv.pt`` (fully convolutional density model on unpooled backbone maps,
:mod:`defectflow.density.conv`), its ONNX graph ``conv.onnx`` and its patch memory ``memory.npy``
(:mod:`defectflow.density.memory`); per-position NLL -> anomaly maps (:mod:`defectflow.anomaly_maps`)
and the image score: the memory's distance at the map's highest cells, or (no memory) the map's maximum."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from defectflow.config import Params
from defectflow.features import iter_decoded
from defectflow.model_files import CONV_FILE, CONV_HEAD_FILE, MEMORY_FILE, ModelError, head_session


def map_extractor(features: dict, params: Params):
    """The :class:`~defectflow.anomaly_maps.MapExtractor` of a conv head's ``features`` (from its meta or
    from ``MapExtractor.describe()`` + pretrained / weights)."""
    from defectflow.anomaly_maps import MapExtractor

    return MapExtractor(features["backbone"], image_size=features["image_size"], levels=features["levels"],
                        pretrained=features.get("pretrained", params.train.pretrained),
                        weights=params.train.weights or features.get("weights"), threads=params.train.threads,
                        input_norm=features.get("input_norm", "none"))


def extract_maps(fx, paths, on_bad_image: str = "error", chunk: int = 64, progress: bool = False,
                 desc: str = "maps") -> tuple[list[np.ndarray], np.ndarray, list]:
    """Unpooled backbone maps of image files, one rotation: (``[(n_ok, C_i, h_i, w_i)]``, ok mask ``(N,)``,
    skipped ``(path, error)``). Unreadable images stop (``error``) or are left out (``skip``)."""
    paths = list(paths)
    ok = np.zeros(len(paths), bool)
    skipped: list = []
    parts: list[list[np.ndarray]] = [[] for _ in fx.levels]
    batches = iter_decoded(paths, fx.image_size, threads=fx.threads, batch_size=chunk, on_bad_image=on_bad_image)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(paths) // chunk), desc=desc, unit="chunk", leave=False)
    for idx, images, sk in batches:
        skipped += sk
        ok[idx] = True
        if images:
            for k, m in enumerate(fx.maps(images)):
                parts[k].append(m)
    maps = [np.concatenate(p) if p else np.zeros((0, c, 1, 1), np.float32) for p, c in zip(parts, fx.channels)]
    return maps, ok, skipped


@dataclass
class ConvHead:
    """A trained conv head (``conv.pt`` and its ONNX export ``conv.onnx``): the density model and its
    meta (features, best epochs). Scores run in ONNX Runtime when ``conv.onnx`` is there, else torch."""
    model: object                       # defectflow.density.conv.ConvFlow
    meta: dict
    path: Path
    memory: object = None               # defectflow.density.memory.PatchMemory, or None
    _fx: object = None
    _session: object = None

    @property
    def image_size(self) -> int:
        return int(self.meta["features"]["image_size"])

    @property
    def levels(self) -> list[int]:
        return list(self.meta["features"]["levels"])

    def extractor(self, params: Params):
        """Its own ONNX Runtime backbone session (not needed when it shares the image head's pass)."""
        if self._fx is None:
            f = self.meta.get("features") or {}
            fx = map_extractor(f, params)
            if fx.weights_id != f.get("weights_id"):
                raise ModelError(f"{self.path}: backbone weights differ from training "
                                 f"({fx.weights_id} now, {f.get('weights_id')} then): retrain the model")
            self._fx = fx
        return self._fx

    def session(self, threads: int = 2):
        if self._session is None:
            file = self.path.parent / CONV_HEAD_FILE
            self._session = head_session(file, threads, "conv head") if file.is_file() else False
        return self._session or None

    def nll_maps(self, feature_maps: Sequence[np.ndarray], threads: int = 2,
                 backend: str = "auto", batch_size: int = 32) -> list[np.ndarray]:
        """``-log p / C`` per position per group ``[(N, h_g, w_g)]`` (nats per channel) of backbone maps,
        in batches of ``batch_size`` images (cache-sized: a whole set at once ran 15% slower)."""
        sess = self.session(threads) if backend in ("auto", "onnx") else None
        if sess is None:
            return [t.numpy() for t in self.model.nll_per_dim_maps(feature_maps, batch_size)]
        parts = [sess.run(None, {f"map{k}": np.ascontiguousarray(m[i:i + batch_size], np.float32)
                                 for k, m in enumerate(feature_maps)})
                 for i in range(0, len(feature_maps[0]), batch_size)]
        if not parts:
            return [np.zeros((0, *feature_maps[g[0]].shape[2:]), np.float32) for g in self.model.config.group_inputs]
        return [-np.concatenate([p[k] for p in parts]) / c for k, c in enumerate(self.model.channels)]

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The backbone levels of each of the model's groups (one level each, or merged levels)."""
        return [tuple(self.levels[i] for i in g) for g in self.model.config.group_inputs]

    def map_levels(self, params: Params) -> Optional[list[int]]:
        """Positions (in the head's groups) of the groups that make the shown map: those with a level in
        ``maps.levels``; None = all."""
        have = self.levels
        want = params.maps.levels
        if want is None or list(want) == have:
            return None
        if not set(want) <= set(have):
            raise ModelError(f"{self.path}: maps.levels {list(want)} are not all among the conv head's levels "
                             f"{have}: change maps.levels or retrain")
        shown = [k for k, g in enumerate(self.groups) if set(g) & set(want)]
        return None if len(shown) == len(self.groups) else shown

    def summarise(self, feature_maps: Sequence[np.ndarray], params: Params, keep: bool = True,
                  map_threshold: float | None = None) -> tuple[np.ndarray | None, dict]:
        """Anomaly maps at ``train.image_size`` of ``maps.levels`` (if ``keep``) and the per-image columns
        ``score_conv`` (:func:`~defectflow.anomaly_maps.cell_scores` of the shown groups' cells, without
        ``maps.border`` cells at each edge), ``map_mean`` and, given a map threshold, ``map_area`` and
        ``n_boxes``."""
        from defectflow.anomaly_maps import boxes_from_map, cell_scores, combine_levels, to_image_size

        mp = params.maps
        size = (self.image_size,) * 2
        nll = self.nll_maps(feature_maps, params.train.threads)
        shown = self.map_levels(params)
        chosen = nll if shown is None else [nll[i] for i in shown]
        grid = combine_levels(chosen, size, mp.sigma)          # on the map grid; upsampled only when needed
        cols = {"score_conv": (self.verified_scores(feature_maps, chosen, mp.verify_share, mp.border)
                               if self.memory is not None else cell_scores(chosen, mp.score, mp.top_fraction, mp.border)),
                "map_mean": grid.reshape(len(grid), -1).mean(axis=1).astype(np.float64)}
        amaps = to_image_size(grid, size) if keep or map_threshold is not None else None
        if map_threshold is not None:
            cols["map_area"] = (amaps >= map_threshold).reshape(len(amaps), -1).mean(axis=1)
            cols["n_boxes"] = np.array([len(boxes_from_map(a, map_threshold, min_area=mp.min_area)) for a in amaps],
                                       np.int64)
        return (amaps if keep else None), cols

    def verified_scores(self, feature_maps: Sequence[np.ndarray], chosen: Sequence[np.ndarray], share: float,
                        border: int) -> np.ndarray:
        """The largest patch-memory distance over each image's ``share`` highest cells (without ``border`` cells
        at each edge; :func:`~defectflow.density.memory.verify_count`) of the map of the ``chosen`` groups;
        patch features are computed at those cells only."""
        from defectflow.anomaly_maps import cell_map, inner
        from defectflow.density.memory import patch_vectors, verify_count

        cells = cell_map(chosen)
        n, h, w = cells.shape
        core = inner(cells, border)
        b = (h - core.shape[1]) // 2
        flat = core.reshape(n, -1)
        k = verify_count(share, flat.shape[1])
        top = np.argpartition(-flat, k - 1, axis=1)[:, :k] if k < flat.shape[1] else np.tile(np.arange(k), (n, 1))
        ys, xs = np.divmod(top, core.shape[2])
        q = patch_vectors(feature_maps, ys + b, xs + b, self.model.config.local_average, (h, w))
        return self.memory.verify(q)


def load_conv_head(model_dir: Path | str) -> ConvHead:
    from defectflow.density.conv import ConvFitError, load_conv_flow

    path = Path(model_dir) / CONV_FILE
    if not path.is_file():
        raise ModelError(f"{path}: conv head not found (train.head was image when the model was trained?)")
    try:
        model, meta = load_conv_flow(path)
    except ConvFitError as err:
        raise ModelError(str(err)) from None
    memory = None
    if (path.parent / MEMORY_FILE).is_file():
        from defectflow.density.memory import PatchMemory
        try:
            memory = PatchMemory.load(path.parent / MEMORY_FILE)
        except ValueError as err:
            raise ModelError(str(err)) from None
    return ConvHead(model, meta, path, memory=memory)
