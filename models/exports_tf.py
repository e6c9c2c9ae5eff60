"""Magika-like file-type classifier: real TensorFlow, trained briefly, converted by tf2onnx.

Run by make_exports.py in its own interpreter (tensorflow-cpu, tf2onnx, onnx, onnxruntime).
Magika's released model is Keras code exported through jax2tf and tf2onnx; with the jax here,
jax2tf always serialises to StableHLO (one XlaCallModule op) and tf2onnx cannot convert that,
so the model is written in TensorFlow ops directly, in the way jax2tf lowers jax code: the
LayerNorm spelt out as sum / count, broadcast back with tf.broadcast_to to a shape assembled
from tf.shape (tf2onnx: Shape -> Slice/Gather -> Concat -> Expand).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import tensorflow as tf
import tf2onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exports_common import finish, save_data

LENGTH, VOCAB, EMBED, WIDTH, DENSE = 512, 257, 32, 64, 64
TYPES = ["text", "json", "html", "binary", "zip", "png", "utf16", "base64"]
OPSET = 13


def _sample(rng: np.random.Generator, kind: str) -> np.ndarray:
    """The first 256 and last 256 bytes of a made-up file of that kind; 256 pads short files."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz     ,.\n", np.uint8)
    size = int(rng.integers(64, 2048))
    if kind == "text":
        body = rng.choice(letters, size)
    elif kind == "json":
        body = rng.choice(np.frombuffer(b'{}[]":,  abcdef0123456789\n', np.uint8), size)
        body[0] = ord("{")
    elif kind == "html":
        body = rng.choice(np.frombuffer(b"<>/=\" divpahtmlbody  abc\n", np.uint8), size)
        body[:6] = np.frombuffer(b"<html>", np.uint8)
    elif kind == "binary":
        body = rng.integers(0, 256, size)
    elif kind == "zip":
        body = rng.integers(0, 256, size)
        body[:4] = [0x50, 0x4B, 0x03, 0x04]
        body[-22:-18] = [0x50, 0x4B, 0x05, 0x06]
    elif kind == "png":
        body = rng.integers(0, 256, size)
        body[:8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
        body[-8:] = [0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82]
    elif kind == "utf16":
        body = np.zeros(size - size % 2, np.int64)
        body[0::2] = rng.choice(letters, len(body) // 2)
        body[:2] = [0xFF, 0xFE]
    else:
        body = rng.choice(np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                        b"0123456789+/", np.uint8), size)  # fmt: skip
    out = np.full(LENGTH, 256, np.int32)
    half = LENGTH // 2
    head, tail = body[:half], body[-half:]
    out[: len(head)] = head
    out[LENGTH - len(tail) :] = tail
    return out


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TYPES), n)
    return np.stack([_sample(rng, TYPES[k]) for k in labels]), labels.astype(np.int64)


class MagikaLike(tf.Module):
    """One-hot bytes x an embedding matrix, Conv1D, LayerNorm, Dense, max over positions,
    Dense, softmax."""

    def __init__(self) -> None:
        super().__init__()
        init = tf.keras.initializers.GlorotUniform(seed=0)
        self.embed = tf.Variable(init((VOCAB, EMBED)), name="embedding/kernel")
        self.conv = tf.Variable(init((5, EMBED, WIDTH)), name="conv1d/kernel")
        self.conv_b = tf.Variable(tf.zeros(WIDTH), name="conv1d/bias")
        self.gamma = tf.Variable(tf.ones(WIDTH), name="layer_norm/scale")
        self.beta = tf.Variable(tf.zeros(WIDTH), name="layer_norm/bias")
        self.dense = tf.Variable(init((WIDTH, DENSE)), name="dense/kernel")
        self.dense_b = tf.Variable(tf.zeros(DENSE), name="dense/bias")
        self.out = tf.Variable(init((DENSE, len(TYPES))), name="dense_1/kernel")
        self.out_b = tf.Variable(tf.zeros(len(TYPES)), name="dense_1/bias")

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        h = tf.matmul(tf.one_hot(x, VOCAB), self.embed)
        h = tf.nn.relu(tf.nn.conv1d(h, self.conv, 1, "SAME") + self.conv_b)
        # LayerNorm as jax2tf lowers jnp code: sums over the count, explicit broadcasts
        target = tf.stack([tf.shape(h)[0], tf.shape(h)[1], WIDTH])
        mean = tf.broadcast_to(tf.reduce_sum(h, -1, keepdims=True) / WIDTH, target)
        centred = h - mean
        var = tf.reduce_sum(centred * centred, -1, keepdims=True) / WIDTH
        h = centred / tf.broadcast_to(tf.sqrt(var + 1e-5), target) * self.gamma + self.beta
        h = tf.nn.relu(tf.matmul(h, self.dense) + self.dense_b)
        return tf.matmul(tf.reduce_max(h, axis=1), self.out) + self.out_b

    @tf.function(input_signature=[tf.TensorSpec((None, LENGTH), tf.int32, name="bytes")])
    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(self.logits(x))


def main() -> None:
    tf.random.set_seed(0)
    model = MagikaLike()
    opt = tf.keras.optimizers.Adam(3e-3)
    rng_seed = 100
    for step in range(150):
        x, y = _data(rng_seed + step, 32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y, model.logits(tf.constant(x))))  # fmt: skip
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    calib, _ = _data(1, 64)
    val, labels = _data(2, 64)
    probs = model(tf.constant(val)).numpy()
    print(f"magika_like: tensorflow accuracy on val {(probs.argmax(1) == labels).mean():.3f}")
    spec = [tf.TensorSpec((None, LENGTH), tf.int32, name="bytes")]
    proto, _ = tf2onnx.convert.from_function(model.__call__, input_signature=spec, opset=OPSET)
    finish(proto, "magika_like", {"bytes": val[:4]}, [probs[:4]])
    save_data("magika_like", "calib", {"bytes": calib})
    save_data("magika_like", "val", {"bytes": val, "labels": labels})


if __name__ == "__main__":
    main()
