"""maskllm-megatron: learnable N:M (2:4) sparsity for megatron-core models."""
from setuptools import find_packages, setup

setup(
    name="maskllm-megatron",
    version="0.1.0",
    description="MaskLLM learnable N:M semi-structured sparsity as a megatron-core plugin",
    packages=find_packages(include=["maskllm_megatron", "maskllm_megatron.*"]),
    package_data={"maskllm_megatron.masks": ["csrc/*.cpp"],  # the CPU kernels, compiled on first use
                  "maskllm_megatron.inference": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "safetensors",
        "psutil",
        "pyyaml",
    ],
    extras_require={
        # Hugging Face conversion, tokenizers, the real GGUF model of the demo.
        "hf": ["transformers>=4.45", "gguf", "tokenizers", "accelerate"],
        # Metrics and plots of the driver.
        "metrics": ["tensorboard", "matplotlib"],
        "wandb": ["wandb"],
        "test": ["pytest", "pytest-xdist", "transformers>=4.45", "gguf", "tokenizers", "accelerate", "matplotlib", "tensorboard",
                 "compressed-tensors<0.13", "loguru",  # the real reader, to cross-check our 2:4 export
                 # the GPU Triton kernels, tested on CPU through Triton's interpreter
                 "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # GPU-only accelerators; never install these in the CPU environment.
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
    entry_points={"console_scripts": [
        "maskllm-train=maskllm_megatron.train.__main__:main",
        "maskllm-convert=maskllm_megatron.convert.cli:main",
        "maskllm-preprocess=maskllm_megatron.data.preprocess:main",
        "maskllm-verify=maskllm_megatron.export.verify:main",
        "maskllm-export=maskllm_megatron.export.cli:main",
        "maskllm-eval=maskllm_megatron.eval.perplexity:main",
        "maskllm-plot=maskllm_megatron.train.plot:main",
        "maskllm-generate=maskllm_megatron.inference.cli:main",
    ]},
)
