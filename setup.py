"""d2ct: install with `python3 -m d2ct.installer` (or `make setup`), which pins every version
and installs Detectron2 from PyPI; a plain `pip install .` expects Detectron2 to be present."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "d2ct" / "__init__.py").read_text().split('"""', 2)[-1], version)

setup(
    name="d2ct",
    version=version["__version__"],
    description="Class-agnostic CT structure segmentation with Detectron2 Mask R-CNN and pseudo-labelling",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=("d2ct", "d2ct.*")),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy>=1.24",
        "pillow",
        "pycocotools>=2.0.6",
        "opencv-python-headless",
        "pandas",
        "pyarrow",
        "scipy",
        "scikit-image",
        "scikit-learn",
        "nibabel",
        "pydicom>=2.4",
        "matplotlib",
        "tqdm",
        "tensorboard",
        "psutil",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis"]},
    # one command per tool; tools/<name>.py are thin shims of the same main functions
    entry_points={
        "console_scripts": [
            "d2ct-train = d2ct.engine.train_net:main",
            "d2ct-predict = d2ct.engine.predict:main",
            "d2ct-pseudolabel = d2ct.pseudolabel.cli:main",
            "d2ct-evaluate = d2ct.evaluation.cli:main",
            "d2ct-pipeline = d2ct.pipeline.cli:main",
            "d2ct-baseline = d2ct.baseline.cli:main",
            "d2ct-convert-to-coco = d2ct.data.cli.convert_to_coco:main",
            "d2ct-import-volume = d2ct.data.cli.import_volume:main",
            "d2ct-make-holdout = d2ct.data.cli.make_holdout:main",
            "d2ct-make-phantom = d2ct.data.cli.make_phantom:main",
            "d2ct-train-unet = d2ct.peer.cli:main",
        ],
    },
)
