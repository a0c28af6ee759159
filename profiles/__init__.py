"""The shipped hardware profiles (*.toml package data), read by xpack.profiles.profile."""
