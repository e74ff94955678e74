# ctest driver: install the built torch_ext into a scratch prefix, configure and build the
# consumer project out of tree against it with find_package(TorchExt), and run it.
# Variables: TOP_BUILD, CONSUMER_SOURCE, WORK, TORCH_PREFIX, GENERATOR.
file(REMOVE_RECURSE "${WORK}")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run("${CMAKE_COMMAND}" --install "${TOP_BUILD}" --prefix "${WORK}/prefix")
# The prefixes go through the environment (':'-separated): a ';' list would be split here.
run("${CMAKE_COMMAND}" -E env "CMAKE_PREFIX_PATH=${WORK}/prefix:${TORCH_PREFIX}"
    "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${WORK}/build" -G "${GENERATOR}")
run("${CMAKE_COMMAND}" --build "${WORK}/build")
run("${WORK}/build/torch_ext_consumer")
run("${WORK}/build/torch_ext_consumer_by_name")
