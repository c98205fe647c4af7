#pragma once
// What cumo_train, cumo_eval and cumo_distill read back from a checkpoint directory (train::save_checkpoint's):
// trainer_state.json and the metadata strings this app writes — stage, stage_finished, variant, vision_sparse,
// connector_sparse, run_config (the whole config JSON), model_config (CuMoConfig::to_json).
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "app/json_reader.hpp"
#include "app/run_config.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/checkpoint.hpp"

namespace cumo::app {

inline nlohmann::json read_trainer_state(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  CUMO_CHECK(fs::is_directory(dir, ec), "'", dir, "' is not a checkpoint directory (",
             fs::exists(dir, ec) ? "not a directory" : "it does not exist", ")");
  const auto path = (fs::path(dir) / "trainer_state.json").string();
  CUMO_CHECK(fs::exists(path, ec), "'", dir, "' has no trainer_state.json (not a checkpoint?)");
  try {
    return read_config_file(path, "read_trainer_state");
  } catch (const Error& e) {
    fail("checkpoint '", dir, "': ", e.what());
  }
}

inline std::string metadata_of(const nlohmann::json& state, const std::string& key, const std::string& dir) {
  auto m = state.find("metadata");
  CUMO_CHECK(m != state.end() && m->is_object() && m->contains(key) && (*m)[key].is_string(),
             "checkpoint '", dir, "': trainer_state.json metadata lacks '", key, "' (not written by cumo_train?)");
  return (*m)[key].get<std::string>();
}

// The run config a checkpoint written by cumo_train carries in its metadata.
inline RunConfig run_config_of_checkpoint(const std::string& dir, const nlohmann::json& state) {
  nlohmann::json raw;
  try {
    raw = nlohmann::json::parse(metadata_of(state, "run_config", dir));
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint '", dir, "': metadata run_config is not valid JSON: ", e.what());
  }
  return RunConfig::from_json(raw, "checkpoint '" + dir + "' run_config");
}
inline RunConfig run_config_of_checkpoint(const std::string& dir) {
  return run_config_of_checkpoint(dir, read_trainer_state(dir));
}

// Turns the dense parts of `model` sparse as the checkpoint's metadata says (shapes only: loading overwrites every
// value), so that its weights load.
template <class Model>
void match_structure(Model& model, const nlohmann::json& state, const std::string& dir) {
  const bool vs = metadata_of(state, "vision_sparse", dir) == "1";
  const bool cs = metadata_of(state, "connector_sparse", dir) == "1";
  if (vs || cs) {
    Rng dummy(0);
    model.upcycle(dummy, vs && !model.vision_is_sparse(), cs && !model.connector_is_sparse());
  }
}

// Builds the model a checkpoint holds (dense or upcycled, as its metadata says) and loads its weights.
// `config` receives the run config stored in the checkpoint.
inline models::CuMo<> load_model_from_checkpoint(const std::string& dir, const io::Tokenizer& tok, RunConfig* config,
                                                 nlohmann::json* state_out = nullptr) {
  const nlohmann::json st = read_trainer_state(dir);
  RunConfig c = run_config_of_checkpoint(dir, st);
  models::CuMo<> model(c.model_config(tok));
  Rng rng(c.seed);
  model.reset_parameters(rng, c.init);
  match_structure(model, st, dir);
  (void)train::load_checkpoint(dir, model.parameters(), nullptr);
  if (config) *config = std::move(c);
  if (state_out) *state_out = st;
  return model;
}

}  // namespace cumo::app
