"""The systems the suite runs the workloads on: Streamflow and its peers."""
