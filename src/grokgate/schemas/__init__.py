"""Wire models of the contract."""
