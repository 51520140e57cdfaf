"""monai-gradicon: GradICON deep image registration as MONAI components, networks and bundles."""

from setuptools import find_packages, setup

setup(
    name="monai-gradicon",
    version="0.1.0",
    description="GradICON (gradient inverse consistency) deep image registration, native to MONAI",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["monai_gradicon", "monai_gradicon.*"]),
    # the native interpolation kernel is compiled from this source on first use (monai_gradicon/maps/native.py)
    package_data={"monai_gradicon.maps": ["native.cpp", "trilinear.cpp", "upsample.cpp"]},
    python_requires=">=3.9",
    # install torch first (README pins the CPU build); this range is then already satisfied.
    install_requires=[
        "torch>=2.1",
        "monai>=1.3",
        "nibabel",
        "pytorch-ignite>=0.4.11",
        "fire",
        "pyyaml",
        "numpy",
        "matplotlib",
        "tqdm",
        "h5py",
    ],
    # "test" is everything the test suite imports: ITK/SimpleITK read our transforms back, jsonschema runs
    # MONAI's offline verify_metadata, nilearn ships the MNI152 volume of the real-image benchmark,
    # pydicom writes the DICOM series whose geometry is checked against SimpleITK.
    # The authors' icon-registration / unigradicon (the parity oracles) install with --no-deps beside it
    # (their torchvision pin cannot be met beside the CPU torch build): see scripts/run_tests.sh.
    extras_require={
        "itk": ["itk>=5.3", "SimpleITK>=2.2"],
        "test": ["pytest", "itk>=5.3", "SimpleITK>=2.2", "jsonschema>=4", "nilearn>=0.10", "pydicom>=2.4"],
    },
    entry_points={"console_scripts": ["monai-gradicon=monai_gradicon.app.cli:main"]},
)
