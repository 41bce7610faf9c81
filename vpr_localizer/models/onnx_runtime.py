"""Run an exported encoder (:mod:`vpr_localizer.models.onnx_export`) with ONNX Runtime.

:class:`OnnxEncoder` offers the descriptor API of :class:`~vpr_localizer.models.encoder.Encoder`
that offline localisation needs (:meth:`OnnxEncoder.encode_images`, :meth:`OnnxEncoder.encode_paths`,
``dim``, ``fingerprint``) with the same resize (:func:`~vpr_localizer.io.image_files.resize_image`,
via :func:`~vpr_localizer.io.image_files.iter_image_batches` for files) and the same
preprocessing object (:data:`~vpr_localizer.models.backbones.PREPROCESSING`) as the torch encoder,
so only the network runs elsewhere. Backbone features are not available (no Patch-NetVLAD
re-ranking, no guided encoders).

Execution providers are chosen from those installed
(``onnxruntime.get_available_providers()``), in the order :data:`PROVIDER_ORDER`: TensorRT, CUDA,
OpenVINO, CPU.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from vpr_localizer.errors import ConfigError, FingerprintMismatchError, WeightsError
from vpr_localizer.files import sha256_file
from vpr_localizer.io.image_files import iter_image_batches, resize_image
from vpr_localizer.models.backbones import PREPROCESSING, Preprocessing
from vpr_localizer.models.encoder import EncodeResult
from vpr_localizer.models.onnx_export import (SIDECAR_FORMAT, SIDECAR_VERSION, check_plain_fingerprint,
                                              preprocessing_dict, sidecar_path)

#: Execution providers in order of preference; only installed ones are used.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider",
                  "CPUExecutionProvider")


def choose_providers(device: str = "auto", available: Optional[Sequence[str]] = None) -> List[str]:
    """Execution providers for a device choice, best first.

    Args:
        device: ``auto`` (every installed provider of :data:`PROVIDER_ORDER`), ``cpu`` (CPU only),
            ``cuda`` / ``cuda:N`` (TensorRT and CUDA, then CPU), or an explicit comma-separated list
            of provider names.
        available: installed providers (default ``onnxruntime.get_available_providers()``).

    Returns:
        Provider names, ending with ``CPUExecutionProvider``.

    Raises:
        ConfigError: ``cuda`` requested but no GPU provider installed; an explicit provider that
            is not installed; an unknown device string.
    """
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    available = list(available)
    device = (device or "auto").strip()
    if device == "auto":
        chosen = [p for p in PROVIDER_ORDER if p in available]
    elif device == "cpu":
        chosen = ["CPUExecutionProvider"]
    elif device == "cuda" or device.startswith("cuda:"):
        chosen = [p for p in PROVIDER_ORDER[:2] if p in available]
        if not chosen:
            raise ConfigError(f"device {device!r}: onnxruntime has no GPU provider here (installed: "
                              f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu")
        chosen.append("CPUExecutionProvider")
    elif "ExecutionProvider" in device:
        chosen = [p.strip() for p in device.split(",") if p.strip()]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise ConfigError(f"onnxruntime provider(s) {', '.join(missing)} not installed "
                              f"(installed: {', '.join(available)})")
    else:
        raise ConfigError(f"unknown onnxruntime device {device!r}: auto | cpu | cuda | cuda:N | provider names")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def load_sidecar(onnx_path: str) -> Dict:
    """Read and check the sidecar JSON of ``onnx_path``.

    Raises:
        WeightsError: the ``.onnx`` file or its sidecar is missing, the sidecar is not valid JSON,
            not a vpr_localizer ONNX sidecar, of another format version, or lacks a field.
        ConfigError: the sidecar describes a guided encoder.
    """
    onnx_path = os.fspath(onnx_path)
    if not os.path.isfile(onnx_path):
        raise WeightsError(f"ONNX model not found: {onnx_path} (write it with 'vpr-localizer export "
                           f"--map MAP --out {os.path.basename(onnx_path) or 'encoder.onnx'}')")
    side = sidecar_path(onnx_path)
    if not os.path.isfile(side):
        raise WeightsError(f"{onnx_path}: its sidecar {side} is missing (export writes both)")
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{side}: not a readable JSON sidecar ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise WeightsError(f"{side}: not a vpr_localizer ONNX sidecar")
    if meta.get("format_version") != SIDECAR_VERSION:
        raise WeightsError(f"{side}: sidecar version {meta.get('format_version')} is not supported "
                           f"(this build reads version {SIDECAR_VERSION})")
    for key in ("fingerprint", "image_size", "preprocessing", "input", "output"):
        if key not in meta:
            raise WeightsError(f"{side}: the sidecar has no '{key}'")
    if not isinstance(meta["fingerprint"], dict):
        raise WeightsError(f"{side}: 'fingerprint' must be a mapping")
    check_plain_fingerprint(meta["fingerprint"])
    return meta


def provider_options(providers: Sequence[str], fp16: bool = True) -> List:
    """``providers`` as ONNX Runtime session providers with their options: with ``fp16``, the
    TensorRT provider builds its engines in half precision (``trt_fp16_enable``; TensorRT keeps
    layers that need it in fp32). The CUDA and CPU providers run the graph in its own precision
    (an fp32 export stays fp32 there).

    Returns:
        A list of names or ``(name, options)`` tuples, the same order.
    """
    out: List = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and fp16:
            out.append((p, {"trt_fp16_enable": True}))
        else:
            out.append(p)
    return out


class OnnxEncoder:
    """Image -> global descriptor through an exported ONNX encoder and ONNX Runtime.

    Args:
        onnx_path: the ``.onnx`` file; its sidecar (same stem, ``.json``) must lie beside it.
        device: provider choice (:func:`choose_providers`): ``auto`` | ``cpu`` | ``cuda`` | names.
        batch_size: images per session run.
        threads: ONNX Runtime intra-op threads (0 = its default).
        verify_hash: check the ``.onnx`` file's SHA-256 against the sidecar.
        fp16: half precision on a GPU through TensorRT (:func:`provider_options`); no effect on CPU.

    Attributes:
        sidecar: the parsed sidecar.
        fingerprint: the encoder fingerprint recorded at export (the map's ``encoder`` section).
        image_size: network input (width, height), pixels.
        preprocessing: the :class:`Preprocessing` the graph expects its input in.
        providers: the execution providers the session actually uses, best first.
        precision: ``fp32`` or ``int8``.

    Raises:
        WeightsError: missing / corrupt ``.onnx`` or sidecar, a sidecar whose hash or
            preprocessing does not match, or a model ONNX Runtime cannot load.
        ConfigError: a guided encoder, or an unavailable device / provider.
    """

    def __init__(self, onnx_path: str, device: str = "auto", batch_size: int = 8, threads: int = 0,
                 verify_hash: bool = True, fp16: bool = True):
        import onnxruntime

        self.path = os.path.abspath(os.fspath(onnx_path))
        self.sidecar = load_sidecar(self.path)
        side = sidecar_path(self.path)
        if verify_hash and self.sidecar.get("onnx_sha256") and sha256_file(self.path) != self.sidecar["onnx_sha256"]:
            raise WeightsError(f"{self.path} does not match the SHA-256 in its sidecar {side} "
                               f"(the model was replaced after export)")
        pre = self.sidecar["preprocessing"]
        name = pre.get("name") if isinstance(pre, dict) else None
        if name not in PREPROCESSING or preprocessing_dict(PREPROCESSING[name]) != pre:
            raise WeightsError(f"{side}: preprocessing {pre!r} is not one this build knows "
                               f"({', '.join(PREPROCESSING)})")
        self.preprocessing: Preprocessing = PREPROCESSING[name]
        self.fingerprint: Dict = self.sidecar["fingerprint"]
        self.image_size = tuple(int(v) for v in self.sidecar["image_size"])
        self.precision = str(self.sidecar.get("precision", "fp32"))
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        opts = onnxruntime.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = onnxruntime.InferenceSession(self.path, sess_options=opts,
                                                        providers=provider_options(choose_providers(device), fp16))
        except ConfigError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"{self.path}: ONNX Runtime cannot load the model ({exc})") from exc
        self.providers: List[str] = list(self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.dim = int(self.sidecar["output"]["dim"])

    @property
    def device(self) -> str:
        """The provider that runs the graph first, e.g. ``CPUExecutionProvider`` (for logs)."""
        return self.providers[0]

    def check_map(self, vpr_map) -> None:
        """Refuse a map built by another encoder.

        Args:
            vpr_map: a loaded map (anything with ``check_fingerprint(dict)``, e.g.
                :class:`~vpr_localizer.mapping.store.VprMap`).

        Raises:
            FingerprintMismatchError: the sidecar's fingerprint differs from the map's (each
                differing field listed).
        """
        vpr_map.check_fingerprint(self.fingerprint)

    def check_fingerprint(self, fingerprint: Dict) -> None:
        """:meth:`check_map` against a bare fingerprint dict (e.g. a ``map.yaml`` ``encoder`` section).

        Raises:
            FingerprintMismatchError: the fingerprints differ (each differing field listed).
        """
        diffs = [f"{k}: expected {fingerprint.get(k)} vs onnx {self.fingerprint.get(k)}"
                 for k in sorted(set(fingerprint) | set(self.fingerprint)) if fingerprint.get(k) != self.fingerprint.get(k)]
        if diffs:
            raise FingerprintMismatchError(f"{self.path} was exported from a different encoder (" + "; ".join(diffs) + ")")

    def run_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """The graph alone: float32 ``(B, 3, H, W)`` preprocessed -> float32 ``(B, dim)``."""
        return np.asarray(self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0],
                          dtype=np.float32)

    def _describe(self, batch: np.ndarray) -> np.ndarray:
        """``uint8 (B, H, W, 3)`` RGB at ``image_size`` -> ``(B, dim)`` float32."""
        return self.run_preprocessed(self.preprocessing(batch, "cpu").numpy())

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Encode in-memory images (any size; resized here) in batches of ``batch_size``.

        Args:
            images: ``uint8 (H, W, 3)`` RGB arrays.

        Returns:
            ``(N, dim)`` float32 L2-normalised descriptors.

        Raises:
            ImageLoadError: an array is not a valid RGB image.
        """
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for s in range(0, len(images), self.batch_size):
            batch = [resize_image(im, self.image_size) for im in images[s:s + self.batch_size]]
            out.append(self._describe(np.stack(batch)))
        return np.concatenate(out)

    def encode_paths(self, paths: Sequence[str], progress: Optional[str] = None,
                     on_batch: Optional[Callable] = None) -> "EncodeResult":
        """Encode image files in batches, skipping unreadable ones with a warning.

        Args:
            paths: image files.
            progress: tqdm description; None disables the bar.
            on_batch: not supported (there are no backbone features); must be None.

        Returns:
            :class:`~vpr_localizer.models.encoder.EncodeResult`; ``raw`` is ``(N_ok, 0)`` (the
            graph outputs only the final descriptor) and ``extras`` is empty.

        Raises:
            ConfigError: ``on_batch`` given.
        """
        from vpr_localizer.progress import progress_bar

        if on_batch is not None:
            raise ConfigError("the onnxruntime encoder has no backbone features (no re-ranking callback)")
        desc, ok, skipped = [], [], []
        t0 = time.perf_counter()
        bar = progress_bar(total=len(paths), desc=progress, unit="img", disable=progress is None, leave=False)
        for idx, batch in iter_image_batches(paths, self.image_size, self.batch_size,
                                             on_skip=lambda p, r: (skipped.append((p, r)), bar.update(1))):
            desc.append(self._describe(batch))
            ok.extend(idx)
            bar.update(len(idx))
        bar.close()
        d = np.concatenate(desc) if desc else np.zeros((0, self.dim), np.float32)
        return EncodeResult(descriptors=d, raw=np.zeros((len(d), 0), np.float32), extras={}, ok=ok, skipped=skipped,
                            seconds_per_image=(time.perf_counter() - t0) / max(len(ok), 1))
