#pragma once
// Runs the shipped PyTorch fixtures (CUMO_FIXTURE_DIR) of the given kinds through cumo_parity's runners on backend
// B (tools/parity/kinds.hpp): every check of each file must pass and at least `min_passed` of them must have run.
// Returns how many files ran, for the caller's "this many ship" check.
#include <doctest/doctest.h>

#include <filesystem>
#include <set>
#include <string>

#include "parity/kinds.hpp"

namespace cumo::test {

template <class B>
int run_fixture_kinds(const std::set<std::string>& kinds, int min_passed) {
  const auto table = parity::runners<B>();
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(CUMO_FIXTURE_DIR)) {
    if (entry.path().extension() != ".safetensors") continue;
    const auto f = io::SafeTensors::open(entry.path().string());
    const auto it = f.metadata().find("kind");
    if (it == f.metadata().end() || !kinds.contains(it->second)) continue;
    REQUIRE(table.contains(it->second));
    ++files;
    CAPTURE(entry.path().filename().string());
    parity::Report r;
    table.at(it->second)(f, nlohmann::json::parse(f.metadata().at("config")), r);
    CHECK(r.failed == 0);
    CHECK(r.passed >= min_passed);
  }
  return files;
}

}  // namespace cumo::test
