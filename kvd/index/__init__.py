"""Key indexes: one interface (base.KeyIndex), several kinds."""
