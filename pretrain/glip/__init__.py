"""GLIP: grounded language-image pretraining (Li et al. 2022) as a method on the pretraining engine."""
