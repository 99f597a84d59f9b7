"""Applications built on the library: the command line, the demo, the experiments, the PDE solver
and the dataset readers. The library never imports this package."""
