"""What sits under the nvgrace variant: the Backend trait and its implementations."""
