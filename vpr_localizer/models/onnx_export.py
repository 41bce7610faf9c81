"""Export of a plain encoder (backbone + NetVLAD / GeM / GAP + PCA whitening) to ONNX.

The exported graph is the network part of :meth:`~vpr_localizer.models.encoder.Encoder.encode_batch`:

* input ``images``: float32 ``(B, 3, H, W)``, already resized to the encoder's ``image_size`` and
  preprocessed exactly as the torch encoder does before the backbone
  (:class:`~vpr_localizer.models.backbones.Preprocessing`: channel order, scale, mean, std);
  B is a dynamic axis, H and W are fixed;
* output ``descriptors``: float32 ``(B, D)``, the final descriptor. With PCA whitening
  (:class:`~vpr_localizer.models.pca.PCAWhitening`) the transform is folded into the graph as
  ``normalize(((x - mean) @ components^T) * scale)``, ``scale = 1 / sqrt(lambda + eps * max(lambda) + 1e-12)``
  (a MatMul, a Mul and an L2 normalisation), so ``D`` is the PCA dimension; without PCA it is the
  aggregator's raw dimension.

Beside ``FILE.onnx`` a sidecar ``FILE.json`` records what a runtime needs to feed the graph and
to check that it belongs to a map (:data:`SIDECAR_FORMAT`): the encoder fingerprint, input size,
preprocessing, output dimension, opset, the torch / onnx / onnxruntime versions, the precision
(``fp32`` or ``int8``) and the SHA-256 of the ``.onnx`` file.

int8: static quantisation with ``onnxruntime.quantization.quantize_static`` (QDQ format,
per-channel int8 weights, uint8 activations, MinMax calibration) of the *backbone's*
convolutions; the aggregation and PCA stay float32 (NetVLAD's sharp soft-assignment and the
whitening are sensitive to 8-bit rounding). Calibration runs the float model on real images
(:class:`ImageCalibrationReader`).

Guided encoders (segmentation stream, static mask, attention) are not exported yet
(:data:`GUIDED_NOT_SUPPORTED`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vpr_localizer.errors import ConfigError, ImageLoadError
from vpr_localizer.files import sha256_file
from vpr_localizer.io.image_files import iter_image_batches
from vpr_localizer.models.backbones import Preprocessing

LOG = logging.getLogger(__name__)

#: ``format`` of the sidecar JSON; ``format_version`` is :data:`SIDECAR_VERSION`.
SIDECAR_FORMAT = "vpr_localizer.onnx_encoder"
SIDECAR_VERSION = 1
#: Graph input / output names.
INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"
#: Default ONNX opset of :func:`export_onnx`.
DEFAULT_OPSET = 17
#: Message of the :class:`ConfigError` raised for a guided encoder (or a map built with one).
GUIDED_NOT_SUPPORTED = ("export supports plain encoders; guided (segmentation/attention) maps are not "
                        "exported yet")


def sidecar_path(onnx_path: str) -> str:
    """The sidecar JSON of ``onnx_path``: same directory and stem, extension ``.json``."""
    return os.path.splitext(os.fspath(onnx_path))[0] + ".json"


def check_plain_fingerprint(fingerprint: Dict) -> None:
    """Refuse an encoder fingerprint with a ``guidance`` section (a guided encoder).

    Raises:
        ConfigError: :data:`GUIDED_NOT_SUPPORTED`.
    """
    if fingerprint.get("guidance"):
        raise ConfigError(GUIDED_NOT_SUPPORTED)


def preprocessing_dict(pre: Preprocessing) -> Dict:
    """The sidecar form of a :class:`Preprocessing`: name, bgr, scale, mean, std (network channel order)."""
    return {"name": pre.name, "bgr": bool(pre.bgr), "scale": float(pre.scale),
            "mean": [float(v) for v in pre.mean], "std": [float(v) for v in pre.std]}


class ExportGraph(nn.Module):
    """The exported network: ``(B, 3, H, W)`` preprocessed float32 -> ``(B, D)`` float32 descriptors.

    Args:
        encoder: a fitted plain :class:`~vpr_localizer.models.encoder.Encoder` (its modules are
            shared, not copied; they are used on CPU).

    Raises:
        ConfigError: the encoder is guided.
        RuntimeError: the encoder is NetVLAD and has not been fitted.
    """

    def __init__(self, encoder):
        super().__init__()
        if encoder.config.guided or encoder.aggregator_spec.takes_streams(encoder.config):
            raise ConfigError(GUIDED_NOT_SUPPORTED)
        encoder._require_trained()
        self.backbone = encoder.backbone
        self.aggregator = encoder.aggregator
        pca = encoder.pca
        self.has_pca = pca is not None
        if pca is not None:
            reg = pca.eps * float(pca.eigenvalues.max()) if pca.eigenvalues.size else 0.0
            scale = 1.0 / np.sqrt(pca.eigenvalues.astype(np.float32) + np.float32(reg) + np.float32(1e-12))
            self.register_buffer("pca_mean", torch.from_numpy(np.asarray(pca.mean, np.float32)).reshape(1, -1))
            self.register_buffer("pca_matrix", torch.from_numpy(np.ascontiguousarray(pca.components.T, np.float32)))
            self.register_buffer("pca_scale", torch.from_numpy(scale.astype(np.float32)).reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.aggregator(self.backbone(x))
        if not self.has_pca:
            return d
        y = torch.matmul(d - self.pca_mean, self.pca_matrix) * self.pca_scale
        # PCAWhitening.transform: y / max(||y||, 1e-12)
        return y / torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp(min=1e-12)


class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over image files: each call of
    :meth:`get_next` gives one image, resized to ``size_wh`` and preprocessed as the encoder does.

    Args:
        paths: image files (unreadable ones are skipped with a logged warning).
        size_wh: network input (width, height), pixels.
        preprocessing: the encoder's :class:`Preprocessing`.
        input_name: the graph input name.

    ``get_next()`` returns ``{input_name: float32 (1, 3, H, W)}``, then None when exhausted;
    :attr:`count` is the number of images given so far.
    """

    def __init__(self, paths: Sequence[str], size_wh, preprocessing: Preprocessing, input_name: str = INPUT_NAME):
        self.paths = list(paths)
        self.size_wh = tuple(int(v) for v in size_wh)
        self.preprocessing = preprocessing
        self.input_name = input_name
        self.count = 0
        self._it: Optional[Iterator] = None

    def _batches(self) -> Iterator[Dict[str, np.ndarray]]:
        for _, batch in iter_image_batches(self.paths, self.size_wh, 1):
            yield {self.input_name: self.preprocessing(batch, "cpu").numpy()}

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._it is None:
            self._it = self._batches()
        item = next(self._it, None)
        if item is not None:
            self.count += 1
        return item

    def rewind(self) -> None:
        self._it, self.count = None, 0


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        onnx_path: the ``.onnx`` file.
        sidecar_path: its sidecar ``.json``.
        sidecar: the sidecar's content.
        calibration_images: images used for int8 calibration (0 for fp32).
        seconds: wall time of the export (and quantisation), s.
    """

    onnx_path: str
    sidecar_path: str
    sidecar: Dict = field(default_factory=dict)
    calibration_images: int = 0
    seconds: float = 0.0


def _torch_export(graph: ExportGraph, path: str, size_wh, opset: int) -> None:
    w, h = int(size_wh[0]), int(size_wh[1])
    dummy = torch.zeros(2, 3, h, w, dtype=torch.float32)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of shape checks (the shapes are fixed but B)
        torch.onnx.export(graph, (dummy,), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=int(opset), do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _quantize(fp32_path: str, out_path: str, reader: ImageCalibrationReader) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's recommended pre-processing (shape inference + graph optimisation) first
    pre_path = os.path.join(os.path.dirname(out_path), "preprocessed.onnx")
    quant_pre_process(fp32_path, pre_path)
    model = onnx.load(pre_path)
    backbone_convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/backbone/")]
    del model
    quantize_static(pre_path, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                    nodes_to_quantize=backbone_convs or None)


def export_onnx(encoder, out_path: str, fingerprint: Optional[Dict] = None, opset: int = DEFAULT_OPSET,
                int8: bool = False, calibration_paths: Sequence[str] = ()) -> ExportReport:
    """Write ``encoder`` as ONNX (dynamic batch axis) plus its sidecar JSON.

    Args:
        encoder: a fitted plain :class:`~vpr_localizer.models.encoder.Encoder` (e.g. from
            ``encoder_for_map``); it is exported on CPU and moved back to its device afterwards.
        out_path: the ``.onnx`` file to write (its directory is created); the sidecar goes to
            :func:`sidecar_path` ``(out_path)``. Both are written to temporary files and renamed.
        fingerprint: the fingerprint to record (a map's ``encoder`` section); None =
            ``encoder.fingerprint()``.
        opset: ONNX opset version.
        int8: statically quantise the backbone convolutions (QDQ, per-channel) after export.
        calibration_paths: image files for int8 calibration (required with ``int8``).

    Returns:
        :class:`ExportReport`.

    Raises:
        ConfigError: a guided encoder or fingerprint (:data:`GUIDED_NOT_SUPPORTED`); ``int8``
            without calibration images; ``out_path`` not ending in ``.onnx``.
        ImageLoadError: no calibration image could be read.
        RuntimeError: the encoder is NetVLAD and has not been fitted.
    """
    import time

    import onnx
    import onnxruntime

    t0 = time.perf_counter()
    fp = dict(encoder.fingerprint() if fingerprint is None else fingerprint)
    check_plain_fingerprint(fp)
    if not str(out_path).endswith(".onnx"):
        raise ConfigError(f"export writes an .onnx file, got {out_path!r}")
    if int8 and not calibration_paths:
        raise ConfigError("int8 export needs calibration images (--calibration-images N from the map, "
                          "or --calibration-dir DIR)")
    graph = ExportGraph(encoder)  # ConfigError for a guided encoder, RuntimeError when not fitted
    size_wh = tuple(int(v) for v in encoder.config.image_size)
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    device = encoder.device
    tmpdir = tempfile.mkdtemp(prefix=".onnx-export-", dir=os.path.dirname(out_path))
    n_calib = 0
    try:
        graph.to("cpu").eval()
        fp32 = os.path.join(tmpdir, "fp32.onnx")
        _torch_export(graph, fp32, size_wh, opset)
        final = fp32
        if int8:
            reader = ImageCalibrationReader(calibration_paths, size_wh, encoder.backbone.preprocessing)
            final = os.path.join(tmpdir, "int8.onnx")
            _quantize(fp32, final, reader)
            n_calib = reader.count
            if n_calib == 0:
                raise ImageLoadError(f"none of the {len(calibration_paths)} calibration images could be read")
        model = onnx.load(final)
        onnx.checker.check_model(model)
        out_dim = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
        del model
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "fingerprint": fp,
            "input": {"name": INPUT_NAME, "shape": [None, 3, size_wh[1], size_wh[0]], "dtype": "float32",
                      "layout": "NCHW"},
            "image_size": list(size_wh),
            "preprocessing": preprocessing_dict(encoder.backbone.preprocessing),
            "output": {"name": OUTPUT_NAME, "dim": int(out_dim or encoder.dim), "dtype": "float32",
                       "l2_normalized": True, "pca": bool(graph.has_pca)},
            "precision": "int8" if int8 else "fp32",
            "quantization": ({"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                              "per_channel": True, "weights": "int8", "activations": "uint8",
                              "calibration": "minmax", "calibration_images": n_calib,
                              "quantized": "backbone Conv layers"} if int8 else None),
            "opset": int(opset),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx_sha256": sha256_file(final),
        }
        side = sidecar_path(out_path)
        tmp_side = os.path.join(tmpdir, "sidecar.json")
        with open(tmp_side, "w") as f:
            json.dump(sidecar, f, indent=2)
        os.replace(final, out_path)
        os.replace(tmp_side, side)
    finally:
        graph.to(device)
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    LOG.info("exported %s (%s, %d-D output) + %s", out_path, sidecar["precision"], sidecar["output"]["dim"], side)
    return ExportReport(out_path, side, sidecar, n_calib, time.perf_counter() - t0)


def list_calibration_images(paths: Sequence[str], count: int) -> List[str]:
    """Up to ``count`` existing files of ``paths``, evenly spaced over the list.

    Args:
        paths: candidate image files (e.g. a map's keyframe ``image_path`` values).
        count: how many to keep (>= 1).

    Raises:
        ConfigError: ``count`` < 1.
    """
    if count < 1:
        raise ConfigError(f"--calibration-images must be >= 1, got {count}")
    existing = [p for p in paths if p and os.path.isfile(p)]
    if len(existing) <= count:
        return existing
    idx = np.linspace(0, len(existing) - 1, count).round().astype(int)
    return [existing[i] for i in idx]
