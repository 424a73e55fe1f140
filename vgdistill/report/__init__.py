"""What people look at: rich tables, training curves and drawn boxes."""
