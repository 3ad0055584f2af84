"""Training and evaluation of the U-Net that produces slidejob's weights."""
