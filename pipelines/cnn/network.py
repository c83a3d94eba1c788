"""The small convolutional network trained from scratch: the users' baseline.

``Rescaling(1/255)`` -> [Conv2D 3x3, ReLU, MaxPool 2x2] per entry of ``filters``
-> Flatten -> Dense(``dense_units``, ReLU) -> Dropout -> Dense softmax with L1/L2
on its kernel; Adam. The model takes float 0..255 RGB, as the images are
decoded, so the saved ``.keras`` file is the whole predictor.
"""

from __future__ import annotations

from collections.abc import Sequence


def build_cnn(size: int, n_classes: int, *, filters: Sequence[int] = (32, 64, 128),
              dense_units: int = 128, dropout: float = 0.5, l1: float = 0.0, l2: float = 0.0,
              learning_rate: float = 1e-3, seed: int = 0):
    """A compiled ``(batch, size, size, 3) -> (batch, n_classes)`` Keras model."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for k, width in enumerate(filters):
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{k + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{k + 1}")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classes",
                           kernel_regularizer=keras.regularizers.L1L2(l1=l1, l2=l2))(x)
    model = keras.Model(inputs, outputs, name="cnn")
    compile_classifier(model, learning_rate)
    return model


def compile_classifier(model, learning_rate: float) -> None:
    """Adam on sparse categorical cross-entropy, with accuracy: shared with fine-tuning."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
