"""Training and evaluation of the U-Net that produces slidejob's weights.

Entry points: :func:`slidejob.training.train.train_model` (``slidejob train``)
and :func:`slidejob.training.evaluate.evaluate_model` (``slidejob evaluate``).
The package itself imports nothing heavy, so ``slidejob.training.config`` can
be read without torch.
"""
