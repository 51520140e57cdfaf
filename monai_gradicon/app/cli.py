"""The ``monai-gradicon`` command (python-fire): ``register``, ``register-batch``, ``evaluate``, ``convert-weights``, ``warp``, ``jacobian``.

Examples::

    monai-gradicon register --moving M.nii.gz --fixed F.nii.gz --bundle lung --out result \\
        --moving-mask Mmask.nii.gz --fixed-mask Fmask.nii.gz --io-steps 50 --overview
    monai-gradicon register --moving t1_a.nii.gz --fixed t1_b.nii.gz --bundle unigradicon --modality mri --out result
    monai-gradicon register --moving mr.nii.gz --fixed ct.nii.gz --bundle multigradicon --moving-modality mri \
        --fixed-modality ct --ct-window=-1000,1000 --io-steps 50 --io-sim mind --displacement-format learn2reg --out result
    monai-gradicon register-batch --pairs datalist.json --out registrations --bundle knee --batch-size 4 --num-workers 2
    monai-gradicon evaluate --pairs datalist.json --out evaluation --bundle knee
    monai-gradicon convert-weights --source lung_model_weights_step_2.trch --out lung.pt --bundle lung
    monai-gradicon warp --moving labels.nii.gz --fixed F.nii.gz --transform result/transform.h5 --out warped_labels.nii.gz --nearest
    monai-gradicon jacobian --transform result/transform.h5 --fixed F.nii.gz --out jacobian.nii.gz

Bad input (:data:`monai_gradicon.app.USER_ERRORS`) ends with one ``monai-gradicon: error: ...`` line on
stderr and exit code 2; an internal failure (out of memory, a bug) prints its traceback, a hint where
one helps, and exits with code 1.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

__all__ = ["Commands", "main"]


class Commands:
    """Register scans with GradICON networks, evaluate registrations, import released weights."""

    def register(
        self,
        moving: str,
        fixed: str,
        bundle: str = "knee",
        out: str = "registration",
        moving_labels: str | None = None,
        moving_mask: str | None = None,
        fixed_mask: str | None = None,
        weights: str | None = None,
        io_steps: int = 0,
        io_lr: float = 2e-5,
        overview: bool = False,
        device: str | None = None,
        seed: int = 0,
        modality: str | None = None,
        allow_untrained: bool = False,
        quiet: bool = False,
        moving_modality: str | None = None,
        fixed_modality: str | None = None,
        ct_window=None,
        quantile_range=None,
        io_sim: str | None = None,
        loss_masking: bool = False,
        moving_segmentation: str | None = None,
        fixed_segmentation: str | None = None,
        dice_weight: float = 0.0,
        displacement_format: str = "mm",
    ) -> None:
        """Register MOVING onto FIXED; write warped image, displacement (mm), ITK transforms, inverse, report.

        Args:
            moving: moving image (NIfTI or any format MONAI's LoadImage reads).
            fixed: fixed image; outputs are on its grid.
            bundle: knee | lung | brain | unigradicon | multigradicon | path to a bundle directory.
            out: output folder.
            moving_labels: label map on the moving grid, warped with nearest neighbour.
            moving_mask: mask on the moving grid (required by lung, optional for uni/multiGradICON, refused by others).
            fixed_mask: mask on the fixed grid (same rules).
            weights: weights file (bundle model.pt or the authors' .trch) overriding the bundle's.
            io_steps: instance-optimisation steps (reference default 50; 0 = none).
            io_lr: instance-optimisation learning rate.
            overview: also write overview.png.
            device: cpu | cuda (default: cuda when available).
            seed: seed of the GradICON perturbation during instance optimisation.
            modality: ct | mri for both scans, the intensity window of uniGradICON/multiGradICON (bundles with a 'modality' setting).
            allow_untrained: run a bundle whose weights file is missing (the result is not a registration).
            quiet: no progress bar.
            moving_modality: ct | mri for the moving scan alone (multiGradICON MR-CT pairs); default --modality, else the bundle's.
            fixed_modality: ct | mri for the fixed scan alone.
            ct_window: the CT window in HU as two numbers MIN,MAX, e.g. --ct-window=-1000,1000 (uni/multiGradICON).
            quantile_range: the MR window as two quantiles LO,HI in [0, 1], e.g. --quantile-range=0.01,0.99 (LO None: the minimum).
            io_sim: similarity of instance optimisation: lncc (default) | lncc2 (squared LNCC) | mind (MIND-SSC, 3D); needs --io-steps.
            loss_masking: the masks (both needed) restrict the similarity of instance optimisation instead of multiplying the images; needs --io-steps.
            moving_segmentation: label map on the moving grid: Dice per label in report.json; with --dice-weight a Dice term in instance optimisation.
            fixed_segmentation: label map on the fixed grid with the same labels.
            dice_weight: weight W of the Dice term of instance optimisation (needs both segmentations and --io-steps).
            displacement_format: mm (default) | learn2reg: also write displacement_learn2reg.nii.gz (voxels of the fixed grid, X,Y,Z,3).
        """
        from .register import register

        overrides = _modality(bundle, modality) or {}
        for key, option, value in (("ct_window", "--ct-window", ct_window), ("quantile_range", "--quantile-range", quantile_range)):
            if value is not None:
                overrides[key] = _two_numbers(option, value, key == "quantile_range")
        per_scan = {role: _scan_modality(role, given, modality) for role, given in (("moving", moving_modality), ("fixed", fixed_modality))}
        outputs = register(
            moving, fixed, bundle, out, moving_labels=moving_labels, moving_mask=moving_mask, fixed_mask=fixed_mask,
            weights=weights, io_steps=io_steps, io_learning_rate=io_lr, overview=overview, device=device,
            progress=not quiet, seed=seed, allow_untrained=allow_untrained, overrides=overrides or None,
            moving_modality=per_scan["moving"], fixed_modality=per_scan["fixed"], io_similarity=io_sim,
            loss_masking=bool(loss_masking), moving_segmentation=moving_segmentation, fixed_segmentation=fixed_segmentation,
            dice_weight=float(dice_weight), displacement_format=displacement_format,
        )
        r = outputs.report
        print(
            f"registered in {r['runtime_seconds']['total']:.1f} s: folds {r['forward']['folds']} "
            f"({r['forward']['folds_percent']:.4f} %), NCC {r['similarity']['before']:.4f} -> {r['similarity']['after']:.4f}; "
            f"outputs in {out} (report.json)"
        )
        dice = r.get("segmentation_dice")
        if dice:
            scores = ", ".join(f"{k}: {dice['before'].get(k, float('nan')):.3f} -> {v:.3f}" for k, v in dice["after"].items())
            print(f"Dice per label (before -> after): {scores}" + ("" if dice["dice_term_weight"] > 0 else f"; Dice term {dice['dice_term']}"))

    def evaluate(
        self,
        pairs: str,
        out: str = "evaluation",
        bundle: str | None = None,
        weights: str | None = None,
        io_steps: int = 0,
        device: str | None = None,
        section: str = "testing",
        quiet: bool = False,
    ) -> None:
        """Landmark mTRE (both directions, mean and 25/50/75 %) and Dice + folds over the pairs of a JSON file.

        Args:
            pairs: pair datalist (JSON, the bundles' datalist format; section 'testing').
            out: folder for evaluation.json (and registrations made now).
            bundle: knee | lung | brain | unigradicon | multigradicon | bundle directory, for pairs without a 'registration' folder.
            weights: weights overriding the bundle's.
            io_steps: instance-optimisation steps for registrations made now.
            device: cpu | cuda.
            section: the datalist section to evaluate.
            quiet: no progress bar.
        """
        from .evaluate import evaluate_pairs

        result = evaluate_pairs(
            pairs, out, bundle=bundle, weights=weights, io_steps=io_steps, device=device, progress=not quiet, section=section
        )
        print(json.dumps(result["summary"], indent=2))

    def register_batch(
        self,
        pairs: str,
        out: str = "registrations",
        bundle: str = "knee",
        weights: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        io_steps: int = 0,
        io_lr: float = 2e-5,
        device: str | None = None,
        section: str = "testing",
        seed: int = 0,
        modality: str | None = None,
        overview: bool = False,
        allow_untrained: bool = False,
        quiet: bool = False,
    ) -> None:
        """Register every pair of a datalist with one model, BATCH_SIZE pairs per network call; print a summary table.

        Writes OUT/<id>/ per pair (what `register` writes), OUT/summary.csv and OUT/registrations.json. A pair
        with bad input is reported in the summary, the others are written, and the command exits with code 2
        naming the failed pairs.

        Args:
            pairs: pair datalist (JSON, the bundles' datalist format: moving, fixed, optional moving_label,
                moving_mask, fixed_mask, id, and for uni/multiGradICON modality or moving_modality/fixed_modality).
            out: output folder.
            bundle: knee | lung | brain | unigradicon | multigradicon | path to a bundle directory.
            weights: weights file (bundle model.pt or the authors' .trch) overriding the bundle's.
            batch_size: pairs per network call (more pairs: more memory; instance optimisation runs pair by pair).
            num_workers: processes reading and preprocessing pairs while the network runs (0: none).
            io_steps: instance-optimisation steps per pair (0 = none).
            io_lr: instance-optimisation learning rate.
            device: cpu | cuda (default: cuda when available).
            section: the datalist section to register.
            seed: seed of the GradICON perturbation during instance optimisation.
            modality: ct | mri, the intensity window of uniGradICON/multiGradICON.
            overview: also write overview.png per pair.
            allow_untrained: run a bundle whose weights file is missing (the result is not a registration).
            quiet: no progress bar.
        """
        from .model import load_registration_model
        from .pairs import FailedPairsError, read_summary, register_pairs, summary_table

        model = load_registration_model(bundle, weights, device, allow_untrained=allow_untrained, overrides=_modality(bundle, modality))
        try:
            register_pairs(
                model, pairs, out, section=section, io_steps=io_steps, progress=not quiet, batch_size=batch_size,
                num_workers=num_workers, io_learning_rate=io_lr, seed=seed, overview=overview,
            )
        except FailedPairsError as error:
            print(summary_table(error.rows))
            raise
        print(summary_table(read_summary(out)))
        print(f"outputs in {out} (summary.csv, registrations.json, one folder per pair)")

    def convert_weights(self, source: str, out: str, bundle: str = "knee") -> None:
        """Convert the authors' released weights (knee/lung GradICON, uniGradICON .trch) into a bundle's model.pt.

        Args:
            source: the downloaded reference checkpoint.
            out: output file, e.g. bundles/gradicon_knee_mri/models/model.pt.
            bundle: knee | lung | brain | unigradicon | multigradicon | bundle directory whose network_def receives the weights.
        """
        from .model import convert_reference_weights

        print(f"wrote {convert_reference_weights(source, out, bundle)}")

    def warp(self, moving: str, fixed: str, out: str, transform: str | None = None, nearest: bool = False) -> None:
        """Warp MOVING onto the FIXED grid with an ITK transform file (none: plain resample onto the fixed grid).

        Args:
            moving: image or label map to warp (label maps keep their pixel type with --nearest).
            fixed: the fixed image; the output has its grid and header.
            out: output image.
            transform: transform.h5 / inverse_transform.h5 of register, or any ITK transform file (composite too).
            nearest: nearest-neighbour interpolation (label maps) instead of linear.
        """
        from .transform_files import warp_image

        print(f"wrote {warp_image(moving, fixed, out, transform=transform, nearest=nearest)}")

    def jacobian(self, transform: str, fixed: str, out: str, log: bool = False) -> None:
        """Jacobian determinant map of TRANSFORM on the FIXED grid, and its fold count (det <= 0).

        Args:
            transform: an ITK transform file (transform.h5 of register, or any itk.transformread file).
            fixed: the fixed image whose grid the map is sampled on.
            out: output map (float32, the fixed header).
            log: write log(det); folds are written as NaN, with a warning.
        """
        from .transform_files import jacobian_map

        r = jacobian_map(transform, fixed, out, log=log)
        print(
            f"jacobian: folds {r['folds']} of {r['voxels']} voxels ({r['folds_percent']:.4f} %), "
            f"det min {r['min']:.4f} max {r['max']:.4f}; wrote {'log ' if log else ''}{r['path']}"
        )


def _modality(bundle: str, modality: str | None) -> dict | None:  # noqa: ARG001 (the bundle checks the key exists)
    if modality is None:
        return None
    if modality not in ("ct", "mri"):
        from .errors import InputError

        raise InputError(f"--modality must be 'ct' or 'mri', got {modality!r}.")
    return {"modality": modality}


def _scan_modality(role: str, given: str | None, both: str | None) -> str | None:
    """A scan's modality: its own option, else ``--modality``; the two must agree when both are given."""
    if given is not None and both is not None and given != both:
        from .errors import InputError

        raise InputError(f"--{role}-modality {given!r} contradicts --modality {both!r}: give one of them, or the same value.")
    return given


def _two_numbers(option: str, value, quantiles: bool) -> list:
    """``(low, high)`` from fire's parse of ``--option=LOW,HIGH`` (a tuple), checked: numbers, ``low < high``."""
    from .errors import InputError

    form = f"two numbers LOW,HIGH without spaces, e.g. {option}={'0.01,0.99' if quantiles else '-1000,1000'}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"{option} takes {form}; got {value!r}.")
    low, high = value
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ((high,) if quantiles and low is None else value))
    if not numbers:
        raise InputError(f"{option} takes {form}; got {value!r}.")
    if quantiles and not all(0.0 <= v <= 1.0 for v in value if v is not None):
        raise InputError(f"{option} takes quantiles in [0, 1]; got {value!r}.")
    if low is not None and not low < high:
        raise InputError(f"{option} needs LOW < HIGH; got {value!r}.")
    return [None if low is None else float(low), float(high)]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``monai-gradicon`` console script.

    Args:
        argv: command-line arguments without the program name (default: ``sys.argv[1:]``);
            ``convert-weights`` is accepted for ``convert_weights``.

    Returns:
        the exit code: 0 on success, 2 on bad input (one-line message on stderr), 1 on an internal
        failure (traceback on stderr), fire's code on ``--help``.
    """
    import fire

    from .errors import USER_ERRORS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-weights":
        argv[0] = "convert_weights"
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        fire.Fire(Commands(), command=argv, name="monai-gradicon")
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    except USER_ERRORS as error:
        print(f"monai-gradicon: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # an internal failure: never reported as bad input
        traceback.print_exc()
        hint = ""
        if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
            hint = " (out of memory: try --device cpu, close other jobs, or a machine with more memory)"
        print(f"monai-gradicon: internal error: {type(error).__name__}{hint}; please report it with the traceback above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
