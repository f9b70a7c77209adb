"""Toy distillation lab: a 2-D conditional teacher on which every method must beat the undistilled teacher."""
