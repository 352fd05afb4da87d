"""Tools that explain and measure attention."""
