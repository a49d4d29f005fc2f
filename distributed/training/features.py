"""--cache-features: with the backbone frozen, its output never changes, so compute it once per image and
train only the head on the cached features (the thesis's frozen-VGG16 setup becomes ~100x cheaper per
epoch). The head model shares its layers with the full model, so training it trains the full model's
head: the exported model is still the whole network."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from distributed.model.kerasenv import keras
from distributed.model.builders import HEAD_PREFIX
from distributed.model.heads import LOGITS_NAME, OUTPUT_NAME
from cxrscale.errors import CxrError


def split_at_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(feature extractor: image -> backbone output, head: backbone output -> probabilities), sharing the
    full model's layers. The head is the chain of layers named head_*, logits and predictions."""
    head = [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX)
            or layer.name in (LOGITS_NAME, OUTPUT_NAME)]
    if not head:
        raise CxrError(f"model {model.name} has no head layers to train on cached features")
    extractor = keras.Model(model.input, head[0].input, name=f"{model.name}_features")
    if any(layer.trainable_weights for layer in extractor.layers):
        raise CxrError("--cache-features needs the whole backbone frozen (--freeze-base, no --fine-tune-from)")
    features = keras.Input(head[0].input.shape[1:], name="features")
    x = features
    for layer in head:
        x = layer(x)
    return extractor, keras.Model(features, x, name=f"{model.name}_head")


def compute_features(extractor: keras.Model, images: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Backbone outputs (float32) and labels of a finite, batched (image, label) dataset, in its order."""
    feats, labels = [], []
    for x, y in images:
        feats.append(np.asarray(extractor(x, training=False), np.float32))
        labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def cached_train_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless, shuffled, batched (feature, label) stream over this worker's cached features."""
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
