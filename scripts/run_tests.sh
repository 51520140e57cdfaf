#!/usr/bin/env bash
# Install everything the tests need from scratch and run them (this is what `.ci/run` calls, via README).
#   1. ./.venv: torch pinned to the local CPU build 2.13.0 first (an unpinned torch would pull a CUDA
#      build of several GB), then this package with its "test" extras (ITK/SimpleITK for the transform
#      round trips, jsonschema for the offline bundle metadata check, nilearn: its wheel carries the
#      MNI152 volume of the real-image benchmark), and the authors' icon-registration 1.1.9 and
#      unigradicon 1.0.6 as the parity oracles (--no-deps: their torchvision requirement is not needed).
#      The native CPU kernels (monai_gradicon/maps/native.cpp, trilinear.cpp, upsample.cpp) are built before the tests
#      (gcc and ninja) into ./.torch_extensions, where the tests' own processes find them.
#   2. ./.venv-deploy: the MONAI Deploy App SDK on top of ./.venv, kept apart because the SDK installs
#      into the `monai` package itself; the tests marked deploy_sdk run there.
# Both runs fail on a missing optional dependency (MONAI_GRADICON_REQUIRE_*) and on any skipped test
# (MONAI_GRADICON_FORBID_SKIPS, tests/conftest.py); pytest's own exit code 5 (no tests) fails as well.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/pip install -q --no-deps "icon-registration==1.1.9" "unigradicon==1.0.6" footsteps
# build the native kernels once, before the tests start processes of their own (fails here if it can't);
# in a folder of this checkout, so that CI builds it from scratch rather than finding another checkout's build
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
.venv/bin/python -c "from monai_gradicon.maps import native; assert native.native_available(), native._failure"
MONAI_GRADICON_REQUIRE_ITK=1 MONAI_GRADICON_REQUIRE_REFERENCE=1 MONAI_GRADICON_FORBID_SKIPS=1 \
  .venv/bin/python -m pytest -q -p no:cacheprovider -m "not deploy_sdk" tests

$PY -m venv .venv-deploy
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
deploy_site=$(.venv-deploy/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$site')" > "$deploy_site/main_venv.pth"
.venv-deploy/bin/pip install -q --ignore-installed --no-deps "monai==1.6.1"
.venv-deploy/bin/pip install -q "monai-deploy-app-sdk==4.0.0" "holoscan-cli==4.2.0" highdicom pydicom
MONAI_GRADICON_REQUIRE_DEPLOY=1 MONAI_GRADICON_REQUIRE_ITK=1 MONAI_GRADICON_FORBID_SKIPS=1 \
  .venv-deploy/bin/python -m pytest -q -p no:cacheprovider -m deploy_sdk tests
