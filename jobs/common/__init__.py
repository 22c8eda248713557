"""What every job stands on: the command line, typed configs, storage, the Ray session, MLflow,
plots, and the dataset contracts (the only link between tokenising and everything that reads shards).
Imports no job."""
