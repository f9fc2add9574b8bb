"""Datasets: synthetic subjects with ground truth, ZJU-MoCap and PeopleSnapshot loaders, evaluation protocols."""
