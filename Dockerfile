# The training image for TorchX's container schedulers (`-s kubernetes`, `-s local_docker`); see docs/launch.md
# "Container image". Two stages on PyTorch's CUDA images: `kernels` (devel: has nvcc) compiles the mamba-ssm /
# causal-conv1d wheels against torch 2.13.0; the runtime stage installs the pinned GPU stack of requirements/
# (torch, CUDA fbgemm-gpu, torchrec --no-deps and its runtime needs), those wheels, and the project, with the
# repository as WORKDIR so that `configs/...` resolves. The kernels are always compiled here (MAMBA_FORCE_BUILD /
# CAUSAL_CONV1D_FORCE_BUILD: their setup.py would otherwise fetch a prebuilt wheel from GitHub and, offline, abort
# on the URLError it does not catch), MAX_JOBS nvcc jobs at a time, with the devel image's nvcc, whose CUDA major
# must equal torch's (BASE_TAG and CUDA_VARIANT name the same CUDA). The build fails when the kernels do not
# import (tools/check_cuda_kernels.py; importing needs no GPU).
#
#   docker build -t mdaf-rec:latest .                                  # the component's default --image
#   docker build --build-arg BASE_TAG=2.13.0-cuda12.6-cudnn9 --build-arg CUDA_VARIANT=cu126 -t mdaf-rec:cu126 .
#
# Never built by this project so far (its machines have neither Docker nor a GPU).
ARG BASE_TAG=2.13.0-cuda12.8-cudnn9
ARG CUDA_VARIANT=cu128
ARG MAX_JOBS=4

FROM pytorch/pytorch:${BASE_TAG}-devel AS kernels
ARG CUDA_VARIANT
ARG MAX_JOBS
ENV MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS}
WORKDIR /build
COPY requirements/gpu.txt requirements/gpu-kernels.txt requirements/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/${CUDA_VARIANT} -r requirements/gpu.txt \
 && pip install --no-cache-dir packaging ninja wheel setuptools \
 && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels -r requirements/gpu-kernels.txt

FROM pytorch/pytorch:${BASE_TAG}-runtime
ARG CUDA_VARIANT
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/mdaf_rec
COPY requirements/ requirements/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/${CUDA_VARIANT} -r requirements/gpu.txt \
 && grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements/cpu.txt > /tmp/requirements-rest.txt \
 && pip install --no-cache-dir -c requirements/gpu.txt -r /tmp/requirements-rest.txt -r requirements/dev.txt \
 && pip install --no-cache-dir --no-deps -r requirements/torchrec.txt
COPY --from=kernels /wheels /tmp/wheels
RUN pip install --no-cache-dir -c requirements/gpu.txt /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . && python tools/check_cuda_kernels.py
# On a GPU host: docker run --gpus all mdaf-rec:latest bash tools/gpu_check.sh   (the build itself sees no GPU)
