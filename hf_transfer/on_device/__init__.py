"""What happens to a batch on the training device: preprocessing for each model, and batch mixing."""
