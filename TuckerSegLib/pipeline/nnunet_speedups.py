"""Speed-ups of nnU-Net's own predictor that leave its output unchanged.

Why: on a small CPU, a single TotalSegmentator case spends seconds in process spawns and in a
one-core argmax around a network that runs in about three. Each function here reroutes to
nnU-Net's (or torch's) equivalent computation; none changes a voxel of the result.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from TuckerSegLib.engines.base import predict_tiles


def in_process_predict_from_files(original: Callable) -> Callable:
    """``predict_from_files`` that runs one case in this process (``predict_from_files_sequential``).

    Why: TotalSegmentator predicts one case per call; nnU-Net's pipelined path spawns a
    preprocessing worker and an export pool for it, and on a small CPU those spawns (each imports
    torch and nnU-Net) cost more than the work: about 7 s around a 3 s network on example_ct with
    --fast. The sequential path runs the same preprocessing (``run_case``), prediction and export
    functions, so the output is the same; several cases or parts keep the pipelined path.
    """
    @functools.wraps(original)  # TotalSegmentator's version inspects its own signature
    def predict_from_files(predictor, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities=False, overwrite=True, num_processes_preprocessing=None,
                           num_processes_segmentation_export=None, folder_with_segs_from_prev_stage=None,
                           num_parts=1, part_id=0, **kwargs):
        sequential = getattr(predictor, "predict_from_files_sequential", None)
        case = single_case(predictor, list_of_lists_or_source_folder) if num_parts == 1 else None
        if sequential is not None and case is not None and \
                all(k in inspect.signature(sequential).parameters for k in kwargs):
            return sequential(case, output_folder_or_list_of_truncated_output_files,
                              save_probabilities=save_probabilities, overwrite=overwrite,
                              folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage, **kwargs)
        extra = {k: v for k, v in (("num_processes_preprocessing", num_processes_preprocessing),
                                   ("num_processes_segmentation_export", num_processes_segmentation_export))
                 if v is not None}
        return original(predictor, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                        save_probabilities=save_probabilities, overwrite=overwrite,
                        folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage,
                        num_parts=num_parts, part_id=part_id, **extra, **kwargs)

    return predict_from_files


def parallel_argmax(original: Callable) -> Callable:
    """``LabelManager.convert_probabilities_to_segmentation`` whose argmax over classes runs on
    every core (the hook installs it on the class while a run lasts).

    Why: nnU-Net takes it with numpy on one core: 1.7 s of an 11 s warm ``--fast`` run on 2 cores
    for 118 classes. ``torch.max`` over the class axis gives the same labels (the first maximum on
    ties, as numpy) and dtype, 4x faster on 2 cores. On the class, not the predictor's instance:
    TotalSegmentator's export builds its own label manager. Region-based models keep nnU-Net's code.
    """

    @functools.wraps(original)
    def convert_probabilities_to_segmentation(label_manager, predicted_probabilities):
        is_numpy = isinstance(predicted_probabilities, np.ndarray)
        probs = torch.from_numpy(predicted_probabilities) if is_numpy else predicted_probabilities
        if not label_manager.has_regions and isinstance(probs, torch.Tensor) and probs.device.type == "cpu" \
                and probs.dim() >= 2 and probs.shape[0] == label_manager.num_segmentation_heads:
            with torch.inference_mode():
                labels = probs.max(0).indices
            return labels.numpy() if is_numpy else labels
        return original(label_manager, predicted_probabilities)

    convert_probabilities_to_segmentation.tuckerseg_original = original
    return convert_probabilities_to_segmentation


def single_case(predictor, source) -> Optional[List[List[str]]]:
    """nnU-Net's list of lists for ``source`` (a folder of nnU-Net inputs or a list of cases) when it
    holds one case, else None.

    Why a list: given a folder, nnU-Net forks a pool of 12 processes to list its files (0.4 s on a
    2-core CPU for one case); the list, built by nnU-Net's own ``create_paths_fn``, is the same.
    """
    if isinstance(source, (list, tuple)):
        return list(source) if len(source) == 1 else None
    ending = (getattr(predictor, "dataset_json", None) or {}).get("file_ending")
    if not ending or not Path(source).is_dir():
        return None
    from nnunetv2.utilities.utils import create_paths_fn

    # nnU-Net's input naming, CASE_XXXX<ending>; outputs (CASE<ending>) may share the folder
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(ending))
    files = sorted(f.name for f in Path(source).iterdir() if f.is_file() and f.name.endswith(ending))
    cases = {m.group(1) for m in (pattern.fullmatch(f) for f in files) if m}
    if len(cases) != 1:
        return None
    return [create_paths_fn(str(source), files, ending, cases.pop())]


_CHUNK_VALUES = 1 << 22  # float32 values per pass (16 MB): whole classes, at least one
_HALF_INF = 65520.0  # floats of at least this magnitude round to inf in float16 (max finite 65504)


def cpu_sliding_window(original: Callable) -> Callable:
    """``nnUNetPredictor._internal_predict_sliding_window_return_logits`` whose accumulation of
    the tiles on the CPU gives nnU-Net's float16 logits bit for bit, in a fraction of the time.

    Why: nnU-Net accumulates the Gaussian-weighted tiles into float16 arrays (sized for GPUs);
    on a CPU, torch's mixed float16 += float32 and float16 ``isinf`` run element by element: 1.1 s
    for one 3 mm tile of 118 classes, 3.0 s for four, on 2 cores (0.6 s and 1.0 s here,
    ``benchmarks/bench_nnunet_speedups.py``). The same float operations in the same order
    (multiply by the Gaussian in float32, add to the float16 sum in float32 and round, divide in
    float32 and round), done a few classes at a time in a float32 buffer, are vectorised and need
    no full-size temporaries. Without mirroring, the tiles go through ``engines.base.predict_tiles``,
    so an engine may run several at once; they are summed in nnU-Net's order. Tiles on a GPU keep
    nnU-Net's code.
    """

    @functools.wraps(original)
    def sliding_window(predictor, data: torch.Tensor, slicers, do_on_device: bool = True):
        results_device = predictor.device if do_on_device else torch.device("cpu")
        if results_device.type != "cpu" or predictor.device.type != "cpu":
            return original(predictor, data, slicers, do_on_device)
        network = predictor.network
        mirroring = predictor.use_mirroring and predictor.allowed_mirroring_axes
        # a tile's output is consumed before the next forward, unless mirroring sums several
        borrowed = getattr(network, "borrowed_outputs", None) if not mirroring else None
        with torch.inference_mode(), (borrowed() if borrowed else contextlib.nullcontext()):
            data = data.to(results_device)
            classes = predictor.label_manager.num_segmentation_heads
            logits = torch.zeros((classes, *data.shape[1:]), dtype=torch.half)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half)
            patch = tuple(predictor.configuration_manager.patch_size)
            if predictor.use_gaussian:
                gaussian = gaussian_weights(patch)
                weight = gaussian.float()  # exact: every float16 is a float32
            else:
                gaussian = weight = None
            step = _classes_per_pass(classes, patch)
            buffer = torch.empty((step, *patch), dtype=torch.float32)
            tiles = (torch.clone(data[sl][None], memory_format=torch.contiguous_format) for sl in slicers)
            if mirroring:
                outputs = (predictor._internal_maybe_mirror_and_predict(tile) for tile in tiles)
            else:  # nnU-Net's call without mirroring; an engine may run several tiles at once
                outputs = predict_tiles(network, tiles, len(slicers))
            for sl, output in zip(slicers, outputs):
                prediction = output[0].to(results_device)
                if prediction.dtype != torch.float32:  # another network output type: nnU-Net's own steps
                    if gaussian is not None:
                        prediction *= gaussian
                    logits[sl] += prediction
                else:
                    for c in range(0, classes, step):
                        part = prediction[c:c + step]
                        if weight is not None:
                            part.mul_(weight)
                        target = logits[(slice(c, c + step), *sl[1:])]
                        b = buffer[:target.shape[0]].view(target.shape)
                        b.copy_(target).add_(part)
                        target.copy_(b)
                n_predictions[sl[1:]] += gaussian if gaussian is not None else 1
            divisor = n_predictions.float()
            infinite = False
            step = _classes_per_pass(classes, data.shape[1:])
            whole = torch.empty((step, *data.shape[1:]), dtype=torch.float32)
            for c in range(0, classes, step):
                target = logits[c:c + step]
                b = whole[:target.shape[0]]
                b.copy_(target).div_(divisor)
                infinite = infinite or bool((b.abs() >= _HALF_INF).any())
                target.copy_(b)
        if infinite:
            raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, "
                               "reduce value_scaling_factor in compute_gaussian or increase the dtype of "
                               "predicted_logits to fp32")
        return logits

    sliding_window.tuckerseg_original = original
    return sliding_window


@functools.lru_cache(maxsize=4)
def gaussian_weights(patch: Tuple[int, ...]) -> torch.Tensor:
    """nnU-Net's tile weights (``compute_gaussian(patch, 1/8, 10)``, float16 on the CPU), bit for
    bit; cached like nnU-Net's, so callers must not modify it.

    Why: nnU-Net filters a delta volume with a 3-D Gaussian, 0.24 s per process for a 3 mm patch
    on 2 cores (0.035 s here, ``benchmarks/bench_nnunet_speedups.py``). The filter is separable
    and scipy applies it axis by axis, so its response to the delta is the outer product of the
    1-D responses, with the same float64 products; the rest (scaling, float16, no zeros) is
    nnU-Net's code."""
    from scipy.ndimage import gaussian_filter1d

    weights = None
    for n in patch:
        delta = np.zeros(int(n))
        delta[int(n) // 2] = 1
        axis = gaussian_filter1d(delta, int(n) / 8, 0, mode="constant", cval=0)
        weights = axis if weights is None else np.multiply.outer(weights, axis)
    weights /= (np.max(weights) / 10)
    gaussian = torch.from_numpy(weights).to(dtype=torch.float16)
    mask = gaussian == 0
    gaussian[mask] = torch.min(gaussian[~mask])
    return gaussian


def _classes_per_pass(classes: int, shape) -> int:
    return max(1, min(classes, _CHUNK_VALUES // max(1, int(np.prod(shape)))))
