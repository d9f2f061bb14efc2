"""Controllers ride on top of the engine and steer a run: the accuracy guard (hold or roll back sparsity when
an evaluation metric drops) and distillation (a teacher's outputs in the loss)."""
