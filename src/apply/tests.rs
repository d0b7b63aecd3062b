//! Unit tests of the apply pipeline over a fake deployer.
