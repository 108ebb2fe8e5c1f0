"""What serves the demo, not the library: the embedded digits model (data, networks, training, evaluation, the
shipped assets) and the Gaussian toy of ReCFG's theory. The core (fastguide.*) never imports this package."""
