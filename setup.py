"""Packaging for sb3_hatrpo (see README.md for the two commands that install and run it)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version = (HERE / "sb3_hatrpo" / "version.txt").read_text().strip()

extras = {
    "mujoco": ["gymnasium-robotics>=1.3", "mujoco>=3.1"],
    "mpe": ["mpe2>=0.0.1"],
    "zoo": [
        "optuna>=4.0",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        "rich>=13.0",
        "tqdm>=4.66",
        "psycopg2-binary>=2.9",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",  # mp4 videos (enjoy --record-video), written frame by frame
    ],
    "tests": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",
        "scipy>=1.11",
        "ruff>=0.6",
        "mypy>=1.10",
        "psycopg2-binary>=2.9",
    ],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="sb3_hatrpo",
    version=version,
    description="HATRPO with joint-KL-budget allocators (HATRPO-W, HATRPO-G) for Stable-Baselines3 and PettingZoo",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sb3_hatrpo", "sb3_hatrpo.*"]),
    package_data={"sb3_hatrpo": ["version.txt", "py.typed", "zoo_configs/*.yml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "gymnasium>=1.0",
        "stable-baselines3>=2.4",
        "sb3-contrib>=2.4",
        "pettingzoo>=1.24",
        "supersuit>=3.9",
        "wandb>=0.17",
        "cloudpickle>=3.0",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["sb3-hatrpo=sb3_hatrpo.train:main"]},
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
