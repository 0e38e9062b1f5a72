"""What a command leaves on disk: output folders published whole, their manifests, and the run report."""
