"""Device profiles shipped as package data, one TOML file per device."""
