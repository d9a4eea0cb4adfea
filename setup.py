from setuptools import find_packages, setup

setup(
    name="improved-diffusion-mri",
    version="0.1.0",
    description="Improved DDPM (Nichol & Dhariwal 2021) as a prior for undersampled MRI reconstruction",
    packages=find_packages(include=["improved_diffusion", "improved_diffusion.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "h5py",
        "blobfile",
        "sigpy",
        "scipy",  # SSIM filters; already required by sigpy, listed because we import it
        "tqdm",
        "Pillow",  # the PNG previews (recon_outputs, prior_sample): image writing and labels
    ],
    extras_require={
        # mpiexec launches (dist_util): mpi4py alone, linked at run time against the site's MPI library. Not a
        # base requirement: mpi4py without a loadable libmpi breaks every sigpy import (sigpy imports
        # mpi4py.MPI whenever mpi4py is installed), and plain or torchrun runs need no MPI.
        "mpi": ["mpi4py"],
        # CPU / laptop set-up: mpi4py with an MPI runtime from PyPI (mpich; clusters bring their own),
        # test tools, nilearn for the MNI152 template the demo set is built from, matplotlib/pillow for
        # PNG previews and figures, fpdf2 to typeset paper.pdf without a
        # LaTeX install (it lays out text, tables and images in a few lines of Python),
        # pymupdf to read paper.pdf back (tests check its text; pages render to PNG for review),
        # dipy for the real scans inside its wheel (dipy/data/files) that the held-out set is built from,
        # nbclient/nbformat/ipykernel to execute notebooks/quickstart.ipynb in the tests.
        "dev": [
            "mpi4py",
            "mpich",
            "pytest",
            "ruff",
            "nilearn",
            "matplotlib",
            "pillow",
            "fpdf2",
            "pymupdf",
            "dipy",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
