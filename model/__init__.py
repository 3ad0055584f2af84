"""The U-Net, its weight format (safetensors + JSON card) and the shipped default weights."""
