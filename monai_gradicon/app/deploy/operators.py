"""MONAI Deploy App SDK operators for GradICON registration (needs ``monai-deploy-app-sdk``).

The SDK's generic ``MonaiBundleInferenceOperator`` cannot serve a registration network: it squeezes
and casts "image" outputs to uint8 (fatal for a displacement field) and its ``NiftiDataLoader`` drops
the affine. These operators keep the files' geometry end to end:

* :class:`RegistrationPairLoaderOperator` finds ``moving``/``fixed`` (and optional labels/masks) in the
  input folder and emits their paths;
* :class:`GradICONRegistrationOperator` registers them with :func:`monai_gradicon.register.register`
  and writes the warped image, the displacement field in mm (NIfTI, fixed header), ITK transforms,
  the inverse direction and ``report.json`` to the output folder; it emits the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from monai_gradicon.app.deploy.pipeline import find_pair, run_registration

__all__ = ["RegistrationPairLoaderOperator", "GradICONRegistrationOperator"]


class RegistrationPairLoaderOperator(Operator):
    """Emit ``{"input_dir": ..., "files": {role: path}}`` for the pair in ``input_folder`` (output port ``pair``)."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("pair")

    def compute(self, op_input, op_output, context) -> None:
        files = find_pair(str(self.input_folder))
        op_output.emit({"input_dir": str(self.input_folder), "files": files}, "pair")


class GradICONRegistrationOperator(Operator):
    """Register the received pair and write the outputs (input port ``pair``, output port ``report``)."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, model_path: str | None, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.model_path = model_path
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pair")
        spec.output("report").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context) -> None:
        pair = op_input.receive("pair")
        report = run_registration(pair["files"], str(self.output_folder), self.model_path)
        self._logger.info(f"registration written to {self.output_folder}: folds {report['forward']['folds']}")
        op_output.emit(report, "report")
