"""Register every pair of a datalist with one model, several pairs per network call: ``monai-gradicon register-batch``.

This is what a bundle's ``configs/inference.json`` ``run`` calls. The datalist is the one pair-list schema
of the package (:func:`monai_gradicon.transforms.load_pair_datalist`): ``{"testing": [{"moving": ...,
"fixed": ..., "moving_mask": ..., "fixed_mask": ..., "moving_label": ..., "id": ...}, ...]}``.

The three stages of :func:`monai_gradicon.app.register`, run over many pairs:

1. a MONAI ``DataLoader`` over a :class:`PreparedPairDataset` reads, checks and preprocesses the pairs
   (:func:`~monai_gradicon.app.prepare_pair`, in ``num_workers`` processes), ``batch_size`` at a time;
2. the ``A``'s and ``B``'s of a batch are stacked and the network is called once per direction; each
   pair's maps are its slice of the batch (the network is in eval mode: BatchNorm uses its running
   statistics, so a pair's maps do not depend on the other pairs of its batch);
3. :func:`~monai_gradicon.app.write_registration` writes each pair into ``<out>/<id>`` (default id:
   the entry's index), exactly what ``monai-gradicon register`` writes for that pair.

A pair with bad input (a missing or unreadable file, grids that do not match, masks against the bundle's
policy, an output folder that cannot be written) does not stop the others: its error is recorded in
``<out>/summary.csv`` and ``<out>/registrations.json``, and :class:`FailedPairsError` is raised once all
the other pairs are written. Internal failures raise at once.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from dataclasses import dataclass

import torch
from monai.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..maps import Deformation
from ..transforms.datalist import entry_modalities, load_pair_datalist
from .errors import USER_ERRORS, InputError
from .instance_optimization import DEFAULT_IO_LEARNING_RATE
from .model import RegistrationModel
from .register import PreparedPair, network_maps, prepare_pair, write_registration

__all__ = ["register_pairs", "pair_name", "PreparedPairDataset", "PairItem", "collate_pair_items", "FailedPairsError", "SUMMARY_COLUMNS", "summary_table", "read_summary"]

#: the columns of ``<out>/summary.csv``, one row per pair (forward direction, ``Φ_AB``, of each report).
SUMMARY_COLUMNS = ("id", "status", "folds", "folds_percent", "ncc_before", "ncc_after", "max_displacement_mm", "seconds", "error")


def pair_name(entry: dict, index: int) -> str:
    """The output folder name of a datalist entry: its ``id``, else its index.

    Args:
        entry: the datalist entry.
        index: its position in the section.

    Returns:
        the folder name.
    """
    return str(entry.get("id", index))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class FailedPairsError(InputError):
    """Some pairs of a datalist had bad input; every other pair was registered and written.

    Args:
        message: names the failed pairs and their errors.
        rows: the summary rows of all pairs (:data:`SUMMARY_COLUMNS`), failed ones with their ``error``.
        reports: the reports of the registered pairs, in datalist order.
    """

    def __init__(self, message: str, rows: list[dict], reports: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows
        self.reports = reports


@dataclass
class PairItem:
    """One item of a :class:`PreparedPairDataset`: a prepared pair, or why it could not be prepared.

    Args:
        index: the entry's position in the datalist section.
        id: its output folder name (:func:`pair_name`).
        pair: the :class:`~monai_gradicon.app.PreparedPair` (on the CPU), or ``None`` when it failed.
        error: the one-line message of the bad input, or ``None``.
    """

    index: int
    id: str
    pair: PreparedPair | None
    error: str | None = None


class _Prepare:
    """The dataset's transform: ``{"index", "id", "entry"}`` -> :class:`PairItem`."""

    def __init__(self, model: RegistrationModel) -> None:
        self.model = model

    def __call__(self, item: dict) -> PairItem:
        entry = item["entry"]
        try:
            try:
                moving_modality, fixed_modality = entry_modalities(entry)
            except ValueError as error:
                raise InputError(str(error)) from None
            pair = prepare_pair(
                self.model, entry["moving"], entry["fixed"], moving_labels=entry.get("moving_label"),
                moving_mask=entry.get("moving_mask"), fixed_mask=entry.get("fixed_mask"), device="cpu",
                moving_modality=moving_modality, fixed_modality=fixed_modality,
            )
        except USER_ERRORS as error:
            return PairItem(item["index"], item["id"], None, _one_line(error))
        return PairItem(item["index"], item["id"], pair)


class PreparedPairDataset(Dataset):
    """A MONAI ``Dataset`` of datalist entries whose items are :func:`~monai_gradicon.app.prepare_pair` results.

    Each item is a :class:`PairItem`; bad input of one pair (``USER_ERRORS``) becomes that item's
    ``error`` instead of stopping a ``DataLoader`` over the others. Pairs are prepared on the CPU (also
    in ``DataLoader`` worker processes); batch them with :func:`collate_pair_items`.

    Args:
        entries: datalist entries (keys ``moving``, ``fixed``, optional ``moving_label``, ``moving_mask``,
            ``fixed_mask``, ``id``).
        model: the registration model whose preprocessing and mask policy apply.
    """

    def __init__(self, entries: list[dict], model: RegistrationModel) -> None:
        data = [{"index": i, "id": pair_name(entry, i), "entry": entry} for i, entry in enumerate(entries)]
        super().__init__(data, transform=_Prepare(model))


def collate_pair_items(items: list[PairItem]) -> list[PairItem]:
    """The ``collate_fn`` of a ``DataLoader`` over a :class:`PreparedPairDataset`: keeps the items as they are.

    Args:
        items: the items of one batch.

    Returns:
        them, as a list (pairs of different image shapes cannot be stacked; the network inputs are).
    """
    return list(items)


def _pair_slice(phi: Deformation, index: int, count: int, model: RegistrationModel) -> Deformation:
    """The maps of pair ``index`` of a batch of ``count``: the slice ``index`` of every field."""
    sizes = [int(f.shape[0]) for f in phi.fields]
    if any(size != count for size in sizes):
        raise InputError(
            f"the network of {model.name!r} returned fields of batch sizes {sizes} for {count} pairs: it does not "
            "register several pairs per call; use batch_size 1 (--batch-size 1)."
        )
    return Deformation([f[index:index + 1] for f in phi.fields], phi.spatial_shape)


def _batch_maps(model: RegistrationModel, pairs: list[PreparedPair], device: torch.device) -> list[tuple[Deformation, Deformation]]:
    """``(Φ_AB, Φ_BA)`` of each pair, from one network call per direction on the stacked pairs."""
    A = torch.cat([p.A for p in pairs]).to(device)
    B = torch.cat([p.B for p in pairs]).to(device)
    with torch.no_grad():
        phi_AB = model.deformation(A, B)
        phi_BA = model.deformation(B, A)
    count = len(pairs)
    return [(_pair_slice(phi_AB, i, count, model), _pair_slice(phi_BA, i, count, model)) for i in range(count)]


def _summary_row(name: str, report: dict | None, error: str | None = None) -> dict:
    if report is None:
        return {column: "" for column in SUMMARY_COLUMNS} | {"id": name, "status": "failed", "error": error}
    return {
        "id": name,
        "status": "ok",
        "folds": report["forward"]["folds"],
        "folds_percent": report["forward"]["folds_percent"],
        "ncc_before": report["similarity"]["before"],
        "ncc_after": report["similarity"]["after"],
        "max_displacement_mm": report["max_displacement_mm"],
        "seconds": report["runtime_seconds"]["total"],
        "error": "",
    }


def summary_table(rows: list[dict]) -> str:
    """The summary rows as a fixed-width text table (what ``monai-gradicon register-batch`` prints).

    Args:
        rows: rows with the keys of :data:`SUMMARY_COLUMNS`.

    Returns:
        the table, one line per pair under a header line.
    """
    header = f"{'id':20s} {'status':6s} {'folds':>7s} {'folds %':>9s} {'NCC before':>10s} {'NCC after':>10s} {'max mm':>8s} {'seconds':>8s}"
    lines = [header]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{str(row['id']):20s} {row['status']:6s} {row['error']}")
            continue
        lines.append(
            f"{str(row['id']):20s} {row['status']:6s} {row['folds']:7d} {row['folds_percent']:9.4f} {row['ncc_before']:10.4f} "
            f"{row['ncc_after']:10.4f} {row['max_displacement_mm']:8.3f} {row['seconds']:8.2f}"
        )
    return "\n".join(lines)


def read_summary(out: str) -> list[dict]:
    """The rows of ``<out>/summary.csv`` with their types (``folds`` an int, measures floats, ``""`` where a pair failed).

    Args:
        out: the output folder of :func:`register_pairs`.

    Returns:
        one dict per pair with the keys of :data:`SUMMARY_COLUMNS`.
    """
    with open(os.path.join(out, "summary.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["status"] == "ok":
            row["folds"] = int(row["folds"])
            row.update({key: float(row[key]) for key in SUMMARY_COLUMNS[3:8]})
    return rows


def _entries(datalist_file: str, section: str) -> list[dict]:
    """The section's entries; missing files are left to each pair (so they fail alone), duplicate ids are refused."""
    try:
        entries = load_pair_datalist(datalist_file, section, check_files=False)
    except ValueError as error:  # the datalist's own errors name the file, section, entry and key
        raise InputError(str(error)) from None
    names = [pair_name(entry, i) for i, entry in enumerate(entries)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"pair ids must be unique (each names an output folder); section '{section}' of {datalist_file!r} repeats {repeated}.")
    return entries


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def register_pairs(
    model: RegistrationModel,
    datalist_file: str,
    out: str,
    section: str = "testing",
    io_steps: int = 0,
    progress: bool = True,
    batch_size: int = 1,
    num_workers: int = 0,
    io_learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    seed: int = 0,
    overview: bool = False,
) -> list[dict]:
    """Register the pairs of one datalist section; write ``<out>/<id>/`` per pair, ``summary.csv`` and ``registrations.json``.

    The model is used for all pairs; pairs are read and preprocessed by a MONAI ``DataLoader``
    (``num_workers`` processes) and registered ``batch_size`` at a time, one network call per direction.
    Each pair's outputs equal those of :func:`~monai_gradicon.app.register` on that pair. With instance
    optimisation (``io_steps > 0``) the pairs are optimised one by one, since the optimised weights are
    the pair's own (the network's weights are restored after each). A pair's ``seconds`` are its
    reading and preprocessing, its share of its batch's network time and its writing.

    Args:
        model: the bundle's ``registration_model``.
        datalist_file: the pair datalist (JSON).
        out: output folder.
        section: which section of the datalist.
        io_steps: instance-optimisation steps per pair (0: none).
        progress: progress bar over the pairs.
        batch_size: pairs per network call (ignored with instance optimisation).
        num_workers: ``DataLoader`` worker processes reading and preprocessing pairs (0: in this process).
        io_learning_rate: Adam learning rate of instance optimisation (reference: 2e-5).
        seed: seeds the GradICON perturbation of each pair's instance optimisation (as ``register``'s).
        overview: also write ``overview.png`` per pair.

    Returns:
        the reports of the pairs, in datalist order.

    Raises:
        InputError: a datalist that cannot be used (not JSON, no such section, unknown keys, repeated ids),
            bad options, an output folder that cannot be created.
        FailedPairsError: some pairs had bad input; raised after all other pairs are written, it carries
            the summary rows and the reports.
    """
    io_steps = _check_count(io_steps, "io_steps", 0)
    batch_size = _check_count(batch_size, "batch_size", 1)
    num_workers = _check_count(num_workers, "num_workers", 0)
    entries = _entries(datalist_file, section)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise InputError(f"output folder {out!r} cannot be created ({error.strerror or error}).") from None
    device = next(itertools.chain(model.network.parameters(), model.network.buffers()), torch.empty(0)).device
    loader = DataLoader(
        PreparedPairDataset(entries, model), batch_size=1 if io_steps else batch_size, num_workers=num_workers,
        shuffle=False, collate_fn=collate_pair_items,
    )
    reports: dict[int, dict] = {}
    errors: dict[int, str] = {}
    names = [pair_name(entry, i) for i, entry in enumerate(entries)]
    with tqdm(total=len(entries), desc="pairs", disable=not progress) as bar:
        for items in loader:
            errors.update({item.index: item.error for item in items if item.pair is None})
            good = [item for item in items if item.pair is not None]
            bar.update(len(items) - len(good))
            if not good:
                continue
            started = time.perf_counter()
            if io_steps:
                pair = good[0].pair
                pair.A, pair.B = pair.A.to(device), pair.B.to(device)
                maps = [network_maps(model, pair, model.objective().to(device), io_steps, io_learning_rate, seed)]
            else:
                maps = [(ab, ba, None) for ab, ba in _batch_maps(model, [item.pair for item in good], device)]
            network_seconds = (time.perf_counter() - started) / len(good)
            for item, (phi_AB, phi_BA, io_report) in zip(good, maps):
                pair = item.pair
                pair.A, pair.B = pair.A.to(device), pair.B.to(device)
                try:
                    outputs = write_registration(
                        model, pair, phi_AB, phi_BA, os.path.join(out, item.id), io_report=io_report, overview=overview,
                        network_seconds=network_seconds,
                    )
                except USER_ERRORS as error:
                    errors[item.index] = _one_line(error)
                else:
                    reports[item.index] = outputs.report
                bar.update(1)
    rows = [_summary_row(names[i], reports.get(i), errors.get(i)) for i in range(len(entries))]
    _write_summary(out, rows, reports)
    ordered = [reports[i] for i in sorted(reports)]
    if errors:
        failed = "; ".join(f"{names[i]!r}: {errors[i]}" for i in sorted(errors))
        raise FailedPairsError(
            f"{len(errors)} of {len(entries)} pairs failed ({failed}); the other pairs are written, see {os.path.join(out, 'summary.csv')}.",
            rows, ordered,
        )
    return ordered


def _write_summary(out: str, rows: list[dict], reports: dict[int, dict]) -> None:
    """``<out>/summary.csv`` (:data:`SUMMARY_COLUMNS`) and ``<out>/registrations.json`` (id, report file or error)."""
    with open(os.path.join(out, "summary.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    listing = [
        {"id": row["id"], "report": reports[i]["files"]["report"]} if i in reports else {"id": row["id"], "error": row["error"]}
        for i, row in enumerate(rows)
    ]
    with open(os.path.join(out, "registrations.json"), "w", encoding="utf-8") as f:
        json.dump(listing, f, indent=2)
